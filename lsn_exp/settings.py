"""Typed settings of each stage, parsed from the Hydra config.

Each mistake is a ``UserError``: one line naming the fix. This module imports no stage and no torch or lm-eval;
``lsn_exp.preflight.validate`` composes these parsers with each stage's own checks before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lsn_exp import CONF_DIR, checks, lid
from lsn_exp.checks import n_facts, positive_int, rate, whole
from lsn_exp.coefsearch import SearchSettings, check_compare
from lsn_exp.data import LANG_ORDER, MT_PROMPTS
from lsn_exp.errors import UserError
from lsn_exp.prompts import DOMAINS as PROMPT_DOMAINS
from lsn_exp.specs import Factor, parse_factor, plain
from lsn_exp.taskindex import TASK_FAMILIES

MAX_TOKENS_ALL = ("all", "none", "null")


@cache
def _conf_defaults(group: str, option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=True)


def with_defaults(group: str, cfg, option: str = "default") -> dict:
    """``cfg`` (a config node, or a partial dict from a test or the API) over conf/<group>/<option>.yaml: every
    default lives in conf/ only."""
    return {**_conf_defaults(group, option), **plain(cfg)}


# --- stage 1: identification -----------------------------------------------------------------------------

@dataclass(frozen=True)
class IdentifySettings:
    languages: tuple[str, ...]
    split: str
    max_tokens: int | None  # None: every sentence of the split
    n_stat_sentences: int
    prefix: str  # auto | bos | eos | none | a token string (lsn_exp.record.prefix_token)
    top_rate: float
    filter_rate: float
    bar_rate: float
    batch_size: int | None  # None: the model's


def identify_settings(identify_cfg) -> IdentifySettings:
    cfg = with_defaults("identify", identify_cfg, "lape")
    langs = checks.lang_codes("identify.languages", cfg["languages"])
    if len(langs) < 2:
        raise UserError(f"identify.languages={langs} is not allowed: LAPE compares two or more languages")
    split = str(cfg["split"])
    if split not in ("dev", "devtest"):
        raise UserError(f"identify.split={split} is not allowed: use dev or devtest")
    raw_cap = cfg["max_tokens"]
    max_tokens = None if raw_cap is None or str(raw_cap).lower() in MAX_TOKENS_ALL else \
        positive_int("identify.max_tokens", raw_cap)
    return IdentifySettings(
        languages=tuple(str(c) for c in langs), split=split, max_tokens=max_tokens,
        n_stat_sentences=positive_int("identify.n_stat_sentences", cfg["n_stat_sentences"]),
        prefix=checks.text("identify.prefix", cfg["prefix"], hint="auto, bos, eos, none or a token"),
        top_rate=rate("identify.top_rate", cfg["top_rate"]),
        filter_rate=rate("identify.filter_rate", cfg["filter_rate"]),
        bar_rate=rate("identify.bar_rate", cfg["bar_rate"]),
        batch_size=positive_int("identify.batch_size", cfg["batch_size"], allow_none=True))


# --- stage 3: LSS ----------------------------------------------------------------------------------------

SEARCH_KEYS = ("n_facts", "sources", "targets")


@dataclass(frozen=True)
class LssSettings:
    n_facts: int | str  # a number or "all"
    seed: int
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    tol: float | None  # None: auto, resolved by the model's dtype (at_dtype)
    batch_size: int | None  # None: the model's
    bootstrap: int
    weakest: int

    def at_dtype(self, dtype) -> LssSettings:
        """``tol: auto`` resolved for the model ``dtype`` (conf/lss/default.yaml says how it was measured)."""
        return self if self.tol is not None else replace(self, tol=default_tol(dtype))

    @property
    def tol_written(self) -> float | str:
        return "auto" if self.tol is None else self.tol


def default_tol(dtype) -> float:
    """The tolerance a win must pass, by model dtype."""
    name = str(dtype).replace("torch.", "")
    return {"float64": 1e-6, "float32": 1e-3}.get(name, 5e-2)


def lss_settings(lss_cfg, key: str = "lss") -> LssSettings:
    """``cfg.lss`` (conf/lss/default.yaml); ``key`` names the settings in messages (lss.search for its sample)."""
    cfg = with_defaults("lss", lss_cfg)
    tol = cfg["tol"]
    if tol is None or str(tol).lower() == "auto":
        tol = None  # resolved by the model's dtype (at_dtype)
    else:
        try:
            tol = float(tol)
        except (TypeError, ValueError):
            raise UserError(f"lss.tol={tol!r} is not a number or auto") from None
        if not 0 <= tol < math.inf:
            raise UserError(f"lss.tol={tol} is not allowed: use auto or a small positive number of nats, e.g. 1e-3")
    return LssSettings(n_facts=n_facts(f"{key}.n_facts", cfg["n_facts"]), seed=whole("lss.seed", cfg["seed"]),
                       sources=checks.lss_langs(cfg["sources"], f"{key}.sources"),
                       targets=checks.lss_langs(cfg["targets"], f"{key}.targets"),
                       tol=tol,
                       batch_size=positive_int("lss.batch_size", cfg["batch_size"], allow_none=True),
                       bootstrap=whole("lss.bootstrap", cfg["bootstrap"]), weakest=whole("lss.weakest", cfg["weakest"]))


# --- the factor search (stage=factor_search, factor=best) ----------------------------------------------------

SEARCH_SAMPLE_KEYS = ("n_facts", "sources", "targets")
GRID_ENTRY_KEYS = ("op", "value", "stat", "coef")  # what a grid entry may set besides its factor


@dataclass(frozen=True)
class FactorSearchSettings:
    """``lss.search``: the grid of patches the search ranks, and the LSS sample it scores them on."""

    grid: tuple[dict, ...]  # entries, each with a unique name
    sample: LssSettings  # lss.search's n_facts / sources / targets over lss's
    disjoint_from: int | str  # lss.n_facts: the reporting sample, which the search's facts avoid


def factor_search_settings(lss_cfg) -> FactorSearchSettings:
    cfg = with_defaults("lss", lss_cfg)
    search = cfg.pop("search", None) or {}
    checks.check_grid({"search": search})
    reported = n_facts("lss.n_facts", cfg["n_facts"])
    cfg.update({k: search[k] for k in SEARCH_SAMPLE_KEYS if search.get(k) is not None})
    return FactorSearchSettings(grid=tuple(named_grid(search.get("grid"))), sample=lss_settings(cfg, "lss.search"),
                                disjoint_from=reported)


def named_grid(entries) -> list[dict]:
    """``lss.search.grid`` as plain entries, each with a unique ``name``."""
    entries = [dict(e) for e in entries or []]
    if not entries:
        raise UserError("lss.search.grid is empty: list entries like {name: pmax, factor: pmax} "
                        "(conf/lss/default.yaml)")
    for entry in entries:
        entry["name"] = entry.get("name") or "_".join(
            f"{k}{entry[k]}" for k in ("factor", *GRID_ENTRY_KEYS) if entry.get(k) is not None)
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise UserError(f"lss.search.grid has duplicate names: {names}")
    return entries


# --- stage 4: downstream ---------------------------------------------------------------------------------

FLORES_SPLITS = ("dev", "devtest")


@dataclass(frozen=True)
class EvalSettings:
    families: tuple[str, ...]
    langs: tuple[str, ...] | None  # task languages; None: every language a family covers
    limit: int | None  # first N documents per task language; None: all
    limits: dict  # family -> limit override
    batch_size: int | None  # None: the model's
    mt_prompt: str = "untargeted"
    flores_split: str = "devtest"
    bootstrap: int = 1000
    seed: int = 0
    include_path: str | None = None  # a directory of the user's lm-eval task YAMLs
    task_langs: dict = field(default_factory=dict)  # lm-eval task -> our language code (else read off its name)

    def limit_for(self, family: str) -> int | None:
        return self.limits.get(family, self.limit)


def eval_settings(eval_cfg) -> EvalSettings:
    """``cfg.eval`` (conf/eval/default.yaml) -> EvalSettings, every mistake as a one-line UserError."""
    cfg = with_defaults("eval", eval_cfg)
    families = cfg["tasks"]
    if families in (None, "all"):
        families = list(TASK_FAMILIES)
    elif isinstance(families, str):
        families = [families]
    if not isinstance(families, list) or not families or not all(isinstance(f, str) and f for f in families):
        raise UserError(f"eval.tasks={families} is not allowed: use all or a list of {', '.join(TASK_FAMILIES)} "
                        f"and lm-eval task or group names")
    include_path = cfg["include_path"]
    if include_path is not None and not Path(str(include_path)).expanduser().is_dir():
        raise UserError(f"eval.include_path={include_path} is not a directory of lm-eval task YAMLs")
    task_langs = {str(k): str(v) for k, v in checks.mapping("eval.task_langs", cfg["task_langs"]).items()}
    unknown = sorted(set(task_langs.values()) - set(LANG_ORDER))
    if unknown:
        raise UserError(f"eval.task_langs names unknown language(s) {unknown}: use codes of {' '.join(LANG_ORDER)}")
    langs = cfg["langs"]
    if langs in (None, "all"):
        langs = None
    else:
        langs = [str(c) for c in checks.as_list(langs)]
        unknown = [c for c in langs if c not in LANG_ORDER]
        if unknown:
            raise UserError(f"eval.langs has unknown language(s) {unknown}: use all or codes of {' '.join(LANG_ORDER)}")
        langs = tuple(langs)
    limits = {str(k): checks.doc_limit(f"eval.limits.{k}", v) for k, v in checks.mapping("eval.limits",
                                                                                             cfg["limits"]).items()}
    bad = [f for f in limits if f not in TASK_FAMILIES and f not in families]
    if bad:
        raise UserError(f"eval.limits names unknown tasks {bad}: use {', '.join(TASK_FAMILIES)} or a task of "
                        f"eval.tasks")
    mt_prompt = str(cfg["mt_prompt"])
    if mt_prompt not in MT_PROMPTS:
        raise UserError(f"eval.mt_prompt={mt_prompt} is not allowed: use one of {', '.join(MT_PROMPTS)}")
    split = str(cfg["flores_split"])
    if split not in FLORES_SPLITS:
        raise UserError(f"eval.flores_split={split} is not allowed: use one of {', '.join(FLORES_SPLITS)}")
    return EvalSettings(families=tuple(dict.fromkeys(families)), langs=langs,
                        limit=checks.doc_limit("eval.limit", cfg["limit"]), limits=limits,
                        batch_size=positive_int("eval.batch_size", cfg["batch_size"], allow_none=True),
                        mt_prompt=mt_prompt, flores_split=split,
                        bootstrap=whole("eval.bootstrap", cfg["bootstrap"]),
                        seed=whole("eval.seed", cfg["seed"]),
                        include_path=None if include_path is None else str(Path(include_path).expanduser()),
                        task_langs=task_langs)


# --- free generation ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateSettings:
    sources: tuple[str, ...]  # prompt languages
    n_prompts: int  # per source
    prompt_words: int
    first_sentence: int
    prompts_file: str | None  # {lang: [prompt, ...]} instead of FLORES openings
    max_new_tokens: int
    repetition_n: int
    max_repetition: float
    prompts: dict | None = None  # the same mapping written in the config (generate.prompts)
    domain: str = "news"  # prompt domain (lsn_exp/prompts.py): news | everyday
    lid: str = "py3langid"  # the language identifier of every label (lsn_exp/lid.py): py3langid | lingua


def generate_settings(generate_cfg) -> GenerateSettings:
    """``cfg.generate`` (conf/generate/default.yaml), every mistake as a one-line UserError."""
    cfg = with_defaults("generate", generate_cfg)
    sources = checks.lang_codes("generate.sources", ["en"] if cfg["sources"] is None else cfg["sources"])
    path = cfg["prompts_file"]
    if path is not None and not Path(str(path)).expanduser().is_file():
        raise UserError(f"generate.prompts_file={path} is not a file: give a YAML file {{lang: [prompt, ...]}}")
    max_repetition = checks.share("generate.max_repetition", cfg["max_repetition"])
    return GenerateSettings(
        sources=tuple(str(c) for c in sources), n_prompts=positive_int("generate.n_prompts", cfg["n_prompts"]),
        prompt_words=positive_int("generate.prompt_words", cfg["prompt_words"]),
        first_sentence=whole("generate.first_sentence", cfg["first_sentence"]),
        prompts_file=None if path is None else str(path),
        prompts=checks.given_prompts(cfg["prompts"], path),
        max_new_tokens=positive_int("generate.max_new_tokens", cfg["max_new_tokens"]),
        repetition_n=positive_int("generate.repetition_n", cfg["repetition_n"]), max_repetition=max_repetition,
        domain=checks.prompt_domain("generate.domain", cfg["domain"], PROMPT_DOMAINS),
        lid=checks.choice("generate.lid", cfg["lid"], lid.IDENTIFIERS))


# --- engine ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineSettings:
    """What runs the model (conf/engine): ``hf`` (transformers in memory) or ``vllm`` (lsn_exp.vllmengine)."""

    name: str = "hf"
    enforce_eager: bool = True
    enable_prefix_caching: bool = False
    max_model_len: int = 2048
    max_num_seqs: int = 64
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5


def engine_settings(engine_cfg) -> EngineSettings:
    """``cfg.engine`` (conf/engine/*.yaml), every mistake as a one-line UserError."""
    cfg = dict(engine_cfg or {"name": "hf"})
    name = checks.choice("engine.name", cfg.pop("name", "hf"), ("hf", "vllm"))
    unknown = set(cfg) - set(EngineSettings.__dataclass_fields__)
    if unknown:
        raise UserError(f"engine.{sorted(unknown)[0]} is not an engine setting: "
                        f"{', '.join(EngineSettings.__dataclass_fields__)}")
    ints = {key: positive_int(f"engine.{key}", cfg[key]) for key in
            ("max_model_len", "max_num_seqs", "tensor_parallel_size") if key in cfg}
    flags = {key: checks.flag(f"engine.{key}", cfg[key]) for key in ("enforce_eager", "enable_prefix_caching")
             if key in cfg}
    memory = {} if "gpu_memory_utilization" not in cfg else {
        "gpu_memory_utilization": checks.share("engine.gpu_memory_utilization", cfg["gpu_memory_utilization"])}
    return EngineSettings(name=name, **ints, **flags, **memory)


# --- compare -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompareSettings:
    targets: tuple[str, ...]
    methods: tuple[dict, ...]  # name, factor, patch / steer / prompt overrides, optional search range
    search: SearchSettings  # the coefficient search (lsn_exp.coefsearch)
    n_prompts: int  # reported prompts per source and domain
    n_final: int  # final-sample prompts per source: the finalists are re-scored there
    domains: tuple[str, ...]
    lss_n_facts: int | str
    xcopa: EvalSettings | None  # XCOPA on compare.xcopa_limit documents per language; None: not run


def compare_settings(compare_cfg) -> CompareSettings:
    """``cfg.compare`` (conf/compare/default.yaml): sizes, methods, search (each method's intervention is checked
    against the job's patch / steer / prompt by preflight)."""
    cfg = with_defaults("compare", compare_cfg)
    targets = tuple(checks.lang_codes("compare.targets", cfg["targets"]))
    lss_n_facts = n_facts("compare.lss_n_facts", cfg["lss_n_facts"])
    n_prompts = positive_int("compare.n_prompts", cfg["n_prompts"])
    xcopa_limit = whole("compare.xcopa_limit", cfg["xcopa_limit"])  # 0 skips XCOPA
    methods = checks.check_compare_sizes(cfg)
    search = check_compare(cfg, PROMPT_DOMAINS)
    return CompareSettings(targets=targets, methods=tuple(methods), search=search, n_prompts=n_prompts,
                           n_final=int(cfg["final"]["n_prompts"]), domains=tuple(cfg["domains"]),
                           lss_n_facts=lss_n_facts,
                           xcopa=eval_settings({"tasks": ["xcopa"], "limit": xcopa_limit, "bootstrap": 0})
                           if xcopa_limit else None)


# --- the whole job -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobSettings:
    """Every setting of one job, parsed once: ``preflight.validate`` returns it and the job's steps read it."""

    config: dict  # the composed config as plain data: cache and winner keys are made of what was written
    model: DictConfig  # the model group, as models.load and models.model_layers read it
    stage: str
    target: str  # lang.code
    factor: Factor
    method: str  # method_name: neurons | diffmean | prompt | ... | best
    seed: int
    force: bool
    dry_run: bool
    identify: IdentifySettings
    neurons_from: str | None  # identify.from: a neuron folder instead of identification
    lss: LssSettings
    factor_search: FactorSearchSettings
    eval: EvalSettings
    generate: GenerateSettings
    compare: CompareSettings
    engine: EngineSettings
    threads: int | None
    scoring_processes: int | str  # auto or a number (forkmap.processes_for decides on the resolved device)
    cache_dir: str | None
    data_root: Path | None

    @property
    def intervention_config(self) -> tuple[dict, dict, dict]:
        """The job's patch, steer and prompt settings (parsed per target by specs.Intervention.from_settings)."""
        return self.config["patch"], self.config["steer"], self.config["prompt"]


def parse_job(cfg) -> JobSettings:
    """The composed job config as typed settings: every group parsed, each mistake one UserError. Checks that need
    the model's config, a neuron folder or lm-eval's task index are preflight's."""
    job = plain(cfg)
    data_root = checks.check_job(job)
    device = str((job.get("model") or {}).get("device", "auto"))
    processes = job.get("scoring_processes", "auto")
    checks.scoring_processes(processes, device)
    checks.check_logger(job.get("logger") or {})
    target = checks.check_lang(job["lang"])
    checks.check_prompt(job.get("prompt") or {})
    if job["patch"].get("others_langs") is not None:
        checks.lang_codes("patch.others_langs", job["patch"]["others_langs"])
    folder = job["identify"].get("from")
    if folder is not None:
        folder = checks.text("identify.from", folder, hint="a neuron folder (python -m lsn_exp.neurons export)")
    return JobSettings(
        config=job, model=OmegaConf.create(job["model"]), stage=str(job.get("stage")), target=target,
        factor=parse_factor(job.get("factor")), method=str(job.get("method_name", "neurons")),
        seed=int(job.get("seed", 0)), force=bool(job.get("force", False)), dry_run=bool(job.get("dry_run", False)),
        identify=identify_settings(job["identify"]), neurons_from=folder,
        lss=lss_settings(job["lss"]), factor_search=factor_search_settings(job["lss"]),
        eval=eval_settings(job["eval"]), generate=generate_settings(job.get("generate")),
        compare=compare_settings(job["compare"]), engine=engine_settings(job.get("engine")),
        threads=checks.threads(job.get("threads")), scoring_processes=processes, cache_dir=job.get("cache_dir"),
        data_root=data_root)
