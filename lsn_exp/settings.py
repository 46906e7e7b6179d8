"""Typed settings of each stage, parsed from the Hydra config and validated before any model loads.

``validate(cfg, stages)`` runs every check a job's config can fail (a dry run included), so a sweep is checked
before it goes to SLURM. Each mistake is a ``UserError``: one line naming the fix. Only light imports here
(no torch, no lm-eval): a bad override must fail in well under a second after Hydra composes the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lsn_exp import checks, data, lid
from lsn_exp.checks import n_facts, positive_int, rate, threads, whole
from lsn_exp.data import LANG_ORDER, MT_PROMPTS
from lsn_exp.errors import UserError
from lsn_exp.prompts import DOMAINS as PROMPT_DOMAINS
from lsn_exp.prompts import check_blocks
from lsn_exp.specs import PatchSpec, SteerSpec, check_layers, parse_factor, plain

MAX_TOKENS_ALL = ("all", "none", "null")


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
    cfg = plain(identify_cfg)
    langs = checks.lang_codes("identify.languages", cfg.get("languages"))
    if len(langs) < 2:
        raise UserError(f"identify.languages={langs} is not allowed: LAPE compares two or more languages")
    split = str(cfg.get("split", "dev"))
    if split not in ("dev", "devtest"):
        raise UserError(f"identify.split={split} is not allowed: use dev or devtest")
    raw_cap = cfg.get("max_tokens")
    max_tokens = None if raw_cap is None or str(raw_cap).lower() in MAX_TOKENS_ALL else \
        positive_int("identify.max_tokens", raw_cap)
    return IdentifySettings(
        languages=tuple(str(c) for c in langs), split=split, max_tokens=max_tokens,
        n_stat_sentences=positive_int("identify.n_stat_sentences", cfg.get("n_stat_sentences", 100)),
        prefix=checks.text("identify.prefix", cfg.get("prefix", "auto"), hint="auto, bos, eos, none or a token"),
        top_rate=rate("identify.top_rate", cfg.get("top_rate", 0.01)),
        filter_rate=rate("identify.filter_rate", cfg.get("filter_rate", 0.95)),
        bar_rate=rate("identify.bar_rate", cfg.get("bar_rate", 0.95)),
        batch_size=positive_int("identify.batch_size", cfg.get("batch_size"), allow_none=True))


# --- stage 3: LSS ----------------------------------------------------------------------------------------

SEARCH_KEYS = ("n_facts", "sources", "targets")


@dataclass(frozen=True)
class LssSettings:
    n_facts: int | str  # a number or "all"
    seed: int
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    tol: float
    batch_size: int | None  # None: the model's
    bootstrap: int
    weakest: int


def default_tol(dtype) -> float:
    """The tolerance a win must pass, by model dtype (conf/lss/default.yaml says how it was measured)."""
    name = str(dtype).replace("torch.", "")
    return {"float64": 1e-6, "float32": 1e-3}.get(name, 5e-2)


def lss_settings(lss_cfg, dtype=None, key: str = "lss") -> LssSettings:
    """``cfg.lss`` (conf/lss/default.yaml) with ``tol: auto`` resolved for the model dtype (default fp32); ``key``
    names the settings in messages (lss.search: search_config's)."""
    cfg = plain(lss_cfg)
    tol = cfg.get("tol", "auto")
    if tol is None or str(tol).lower() == "auto":
        tol = default_tol(dtype or "float32")
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise UserError(f"lss.tol={tol!r} is not a number or auto") from None
    if not 0 <= tol < math.inf:
        raise UserError(f"lss.tol={tol} is not allowed: use auto or a small positive number of nats, e.g. 1e-3")
    return LssSettings(n_facts=n_facts(f"{key}.n_facts", cfg.get("n_facts", 185)),
                       seed=whole("lss.seed", cfg.get("seed", 0)),
                       sources=checks.lss_langs(cfg.get("sources", "all"), f"{key}.sources"),
                       targets=checks.lss_langs(cfg.get("targets", "all"), f"{key}.targets"), tol=tol,
                       batch_size=positive_int("lss.batch_size", cfg.get("batch_size"), allow_none=True),
                       bootstrap=whole("lss.bootstrap", cfg.get("bootstrap", 1000)),
                       weakest=whole("lss.weakest", cfg.get("weakest", 5)))


def search_config(lss_cfg) -> dict:
    """``cfg.lss`` as the factor search scores it: ``lss.search``'s n_facts / sources / targets over lss's."""
    cfg = plain(lss_cfg)
    search = cfg.pop("search", None) or {}
    cfg.update({k: search[k] for k in SEARCH_KEYS if search.get(k) is not None})
    return cfg


# --- stage 4: downstream ---------------------------------------------------------------------------------

FLORES_SPLITS = ("dev", "devtest")


@dataclass(frozen=True)
class TaskFamily:
    """A downstream task family (eval.tasks): one lm-eval task per language it covers; or (kind ``lm_eval``)
    one lm-eval task or group by name, every per-document metric it logs."""

    name: str
    kind: str  # mc | mt | ppl
    metrics: tuple[str, ...]
    task_pattern: str  # {code}: our language code, {dataset}: the dataset's code for it
    lang_field: str | None  # Language attribute naming the dataset's code; None: every language
    exclude: tuple[str, ...] = ()
    local: bool = True  # our task dir (offline); False: lm-eval's tasks from the HF hub

    def langs(self) -> list[str]:
        """Our codes of the languages it covers, in the paper's order."""
        covered = data.LANG_ORDER if self.lang_field is None else data.covered(self.lang_field)
        return [code for code in covered if code not in self.exclude]

    def task(self, code: str) -> str:
        lang = data.language_registry()[code]
        return self.task_pattern.format(code=code, dataset=getattr(lang, self.lang_field) if self.lang_field else code)


TASK_FAMILIES = {
    "xcopa": TaskFamily("xcopa", "mc", ("acc",), "xcopa_local_{code}", "xcopa"),
    "xwinograd": TaskFamily("xwinograd", "mc", ("acc",), "xwinograd_local_{code}", "xwinograd"),
    "include": TaskFamily("include", "mc", ("acc",), "include_base_44_{dataset}", "include", local=False),
    "flores_mt": TaskFamily("flores_mt", "mt", ("chrf++", "bleu", "lang_share", "empty_share"), "flores_mt_{code}",
                        None, exclude=("en",)),
    "flores_ppl": TaskFamily("flores_ppl", "ppl", ("ll_per_token", "ppl", "bits_per_byte"), "flores_ppl_{code}", None),
}


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
    cfg = plain(eval_cfg)
    families = cfg.get("tasks", "all")
    if families in (None, "all"):
        families = list(TASK_FAMILIES)
    elif isinstance(families, str):
        families = [families]
    if not isinstance(families, list) or not families or not all(isinstance(f, str) and f for f in families):
        raise UserError(f"eval.tasks={families} is not allowed: use all or a list of {', '.join(TASK_FAMILIES)} "
                        f"and lm-eval task or group names")
    include_path = cfg.get("include_path")
    if include_path is not None and not Path(str(include_path)).expanduser().is_dir():
        raise UserError(f"eval.include_path={include_path} is not a directory of lm-eval task YAMLs")
    task_langs = {str(k): str(v) for k, v in checks.mapping("eval.task_langs", cfg.get("task_langs")).items()}
    unknown = sorted(set(task_langs.values()) - set(LANG_ORDER))
    if unknown:
        raise UserError(f"eval.task_langs names unknown language(s) {unknown}: use codes of {' '.join(LANG_ORDER)}")
    langs = cfg.get("langs", "all")
    if langs in (None, "all"):
        langs = None
    else:
        langs = [str(c) for c in checks.as_list(langs)]
        unknown = [c for c in langs if c not in LANG_ORDER]
        if unknown:
            raise UserError(f"eval.langs has unknown language(s) {unknown}: use all or codes of {' '.join(LANG_ORDER)}")
        langs = tuple(langs)
    limits = {str(k): checks.doc_limit(f"eval.limits.{k}", v) for k, v in checks.mapping("eval.limits",
                                                                                             cfg.get("limits")).items()}
    bad = [f for f in limits if f not in TASK_FAMILIES and f not in families]
    if bad:
        raise UserError(f"eval.limits names unknown tasks {bad}: use {', '.join(TASK_FAMILIES)} or a task of eval.tasks")
    mt_prompt = str(cfg.get("mt_prompt", "untargeted"))
    if mt_prompt not in MT_PROMPTS:
        raise UserError(f"eval.mt_prompt={mt_prompt} is not allowed: use one of {', '.join(MT_PROMPTS)}")
    split = str(cfg.get("flores_split", "devtest"))
    if split not in FLORES_SPLITS:
        raise UserError(f"eval.flores_split={split} is not allowed: use one of {', '.join(FLORES_SPLITS)}")
    return EvalSettings(families=tuple(dict.fromkeys(families)), langs=langs,
                        limit=checks.doc_limit("eval.limit", cfg.get("limit")), limits=limits,
                        batch_size=positive_int("eval.batch_size", cfg.get("batch_size"), allow_none=True),
                        mt_prompt=mt_prompt, flores_split=split,
                        bootstrap=whole("eval.bootstrap", cfg.get("bootstrap", 1000)),
                        seed=whole("eval.seed", cfg.get("seed", 0)),
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
    cfg = plain(generate_cfg)
    sources = checks.lang_codes("generate.sources", ["en"] if cfg.get("sources") is None else cfg["sources"])
    path = cfg.get("prompts_file")
    if path is not None and not Path(str(path)).expanduser().is_file():
        raise UserError(f"generate.prompts_file={path} is not a file: give a YAML file {{lang: [prompt, ...]}}")
    max_repetition = checks.share("generate.max_repetition", cfg.get("max_repetition", 0.5))
    return GenerateSettings(
        sources=tuple(str(c) for c in sources), n_prompts=positive_int("generate.n_prompts", cfg.get("n_prompts", 16)),
        prompt_words=positive_int("generate.prompt_words", cfg.get("prompt_words", 6)),
        first_sentence=whole("generate.first_sentence", cfg.get("first_sentence", 0)),
        prompts_file=None if path is None else str(path),
        prompts=checks.given_prompts(cfg.get("prompts"), path),
        max_new_tokens=positive_int("generate.max_new_tokens", cfg.get("max_new_tokens", 25)),
        repetition_n=positive_int("generate.repetition_n", cfg.get("repetition_n", 4)), max_repetition=max_repetition,
        domain=checks.prompt_domain("generate.domain", cfg.get("domain", "news"), PROMPT_DOMAINS),
        lid=checks.choice("generate.lid", cfg.get("lid", lid.DEFAULT), lid.IDENTIFIERS))


# --- the job ---------------------------------------------------------------------------------------------

def validate(cfg, stages) -> None:
    """Every check a job's config can fail without loading a model (``dry_run=true`` runs it too): every key of
    every group, whatever the stage; the prompt blocks, lm-eval task names and layer ranges where the stage uses them.

    Raises UserError (one line). Layer ranges are checked against the model's config when it is on disk.
    """
    stage = cfg.get("stage")
    if not isinstance(stage, str) or stage not in stages:
        raise UserError(f"stage={stage} is not one of {', '.join(stages)}")
    job = plain(cfg)
    factor = parse_factor(job.get("factor"))
    checks.check_job(job)
    threads(job.get("threads"))
    checks.scoring_processes(job.get("scoring_processes", "auto"), str((job.get("model") or {}).get("device", "auto")))
    from lsn_exp.models import ARCHITECTURES, model_layers

    checks.check_model(job["model"], ARCHITECTURES)
    checks.check_logger(job.get("logger") or {})
    target = checks.check_lang(job["lang"])
    checks.check_prompt(job.get("prompt") or {})
    if stage == "downstream" and (job.get("prompt") or {}).get("mode", "none") != "none":
        raise UserError("prompt baselines are scored on LSS and generation, not on downstream tasks: "
                        "use prompt.mode=none with stage=downstream")
    _check_stage_settings(job, stage)
    patch_cfg = dict(job["patch"])
    if patch_cfg.get("others_langs") is not None:
        checks.lang_codes("patch.others_langs", patch_cfg["others_langs"])
    if factor.kind == "best":  # the winner brings op/value/stat; the rest of the patch must still parse
        patch_cfg.update(op=None, value=None, stat=None)
        factor = parse_factor(1)
    spec = PatchSpec.from_config(patch_cfg, factor, target)
    steer = SteerSpec.from_config(job.get("steer"), target)
    n_layers = model_layers(cfg.model, job.get("cache_dir"))
    for name, layers in (("patch.layers", spec.layers), ("steer.layers", steer.layers)):
        if layers is not None and n_layers is not None:
            check_layers(layers, n_layers, name)
    _check_compare(job, stage, target)
    from lsn_exp.search import grid_specs  # search imports this module

    checks.check_grid(job["lss"])
    grid_specs(job["lss"], job["patch"], target)  # the factor search's grid (stage=factor_search, factor=best)


def _check_stage_settings(job: dict, stage: str) -> None:
    """identify, lss (and its search sample), eval and generate, each parsed as its stage parses it."""
    identify_settings(job["identify"])
    folder = job["identify"].get("from")
    if folder is not None:
        from lsn_exp.neurons import read_card

        try:
            read_card(checks.text("identify.from", folder, hint="a neuron folder (python -m lsn_exp.neurons export)"))
        except UserError as err:
            raise UserError(f"identify.from={folder}: {err}") from None
    lss_settings(job["lss"])
    lss_settings(search_config(job["lss"]), key="lss.search")
    evaluated = eval_settings(job["eval"])
    if stage == "downstream":
        from lsn_exp.taskindex import check_lm_eval_tasks

        check_lm_eval_tasks([n for n in evaluated.families if n not in TASK_FAMILIES], evaluated.include_path,
                            list(TASK_FAMILIES))


def _check_compare(job: dict, stage: str, target: str) -> None:
    """``compare``'s settings and every method's intervention, always; its prompt blocks where a compare run (or
    method=best, which looks one up) reads them."""
    from lsn_exp.coefsearch import check_compare

    generated = generate_settings(job.get("generate"))
    compare_cfg = job["compare"]
    methods = checks.check_compare_sizes(compare_cfg)
    found = check_compare(compare_cfg, PROMPT_DOMAINS)
    for method in methods:
        _check_method(job, method, target)
    if stage == "compare" or job.get("method_name") == "best":  # the methods, ranges and search sample
        check_blocks(generated, data.resolve_root((job.get("data") or {}).get("root")), compare_cfg["domains"],
                     found, compare_cfg)


def _check_method(job: dict, method: dict, target: str) -> None:
    """A compare.methods entry parses as the job's own settings would: its factor and patch / steer / prompt."""
    try:
        merged = {}
        for group in ("patch", "steer", "prompt"):
            extra = method.get(group) or {}
            if not isinstance(extra, dict) or set(extra) - set(job[group]):
                raise UserError(f"{group}={extra!r} is not allowed: use keys of {group} ({', '.join(job[group])})")
            merged[group] = {**job[group], **extra}
        PatchSpec.from_config(merged["patch"], parse_factor(method.get("factor", 1)), target)
        SteerSpec.from_config(merged["steer"], target)
        checks.check_prompt(merged["prompt"])
    except UserError as err:
        raise UserError(f"compare.methods {method.get('name')!r}: {err}") from None
