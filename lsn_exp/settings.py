"""Typed settings of each stage, parsed from the Hydra config and validated before any model loads.

``validate(cfg, stages)`` runs every check a job's config can fail (a dry run included), so a sweep is checked
before it goes to SLURM. Each mistake is a ``UserError``: one line naming the fix. Only light imports here
(no torch, no lm-eval): a bad override must fail in well under a second after Hydra composes the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lsn_exp import data
from lsn_exp.data import LANG_ORDER, LSS_LANGS, MT_PROMPTS
from lsn_exp.errors import UserError
from lsn_exp.prompts import DOMAINS as PROMPT_DOMAINS, check_blocks
from lsn_exp.patch import PATCHED_VALUES, PatchSpec, check_layers
from lsn_exp.steer import SteerSpec

MAX_TOKENS_ALL = ("all", "none", "null")


def plain(cfg) -> dict:
    """A config node (DictConfig or mapping) as a plain dict."""
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def positive_int(name: str, raw, allow_none: bool = False) -> int | None:
    """``raw`` as an int >= 1 (None passes when ``allow_none``), else a one-line UserError."""
    if raw is None and allow_none:
        return None
    try:
        value = float(str(raw).strip())
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value < 1 or value != int(value):
        allowed = "a whole number >= 1" + (" or null" if allow_none else "")
        raise UserError(f"{name}={raw!r} is not allowed: use {allowed}")
    return int(value)


def rate(name: str, raw) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value <= 1:
        raise UserError(f"{name}={raw!r} is not allowed: use a share in (0, 1], e.g. 0.95")
    return value


# --- the factor ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Factor:
    """``factor=`` parsed: multiply by ``value``, or set to the patched value ``kind``."""

    kind: str  # "mul" | "pmax" | "pmedian" | "best" (the factor search's winner, resolved by the job)
    value: float | None = None

    def __str__(self) -> str:
        return f"{self.value:g}" if self.kind == "mul" else self.kind


def parse_factor(raw) -> Factor:
    text = str(raw).strip().lower()
    if text in PATCHED_VALUES or text == "best":
        return Factor(text)
    try:
        value = float(text) if not isinstance(raw, bool) else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # nan, inf and words other than the names above
        raise UserError(f"factor={str(raw)!r} is not allowed: use a finite number (multiply, e.g. factor=5 or "
                        f"factor=0.5), one of {', '.join(PATCHED_VALUES)} (set to the patched value) or best "
                        f"(the factor search's winner)")
    return Factor("mul", value)


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
    langs = cfg.get("languages") or []
    data.languages(list(langs))  # unknown codes: one line
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
        prefix=str(cfg.get("prefix", "auto")), top_rate=rate("identify.top_rate", cfg.get("top_rate", 0.01)),
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


def _lss_langs(raw, name: str) -> tuple[str, ...]:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "all"):
        return LSS_LANGS
    codes = [c.strip() for c in raw.split(",")] if isinstance(raw, str) else [str(c) for c in raw]
    unknown = [c for c in codes if c not in LSS_LANGS]
    if unknown or not codes:
        raise UserError(f"lss.{name}={raw!r}: use all or a list of LSS languages ({' '.join(LSS_LANGS)})")
    return tuple(c for c in LSS_LANGS if c in codes)  # canonical order


def default_tol(dtype) -> float:
    """The tolerance a win must pass, by model dtype (conf/lss/default.yaml says how it was measured)."""
    name = str(dtype).replace("torch.", "")
    return {"float64": 1e-6, "float32": 1e-3}.get(name, 5e-2)


def lss_settings(lss_cfg, dtype=None) -> LssSettings:
    """``cfg.lss`` (conf/lss/default.yaml) with ``tol: auto`` resolved for the model dtype (default fp32)."""
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
    n_facts = cfg.get("n_facts", 185)
    n_facts = "all" if n_facts is None or str(n_facts).lower() == "all" else positive_int("lss.n_facts", n_facts)
    return LssSettings(n_facts=n_facts, seed=int(cfg.get("seed", 0)),
                       sources=_lss_langs(cfg.get("sources", "all"), "sources"),
                       targets=_lss_langs(cfg.get("targets", "all"), "targets"), tol=tol,
                       batch_size=positive_int("lss.batch_size", cfg.get("batch_size"), allow_none=True),
                       bootstrap=int(cfg.get("bootstrap", 1000)), weakest=int(cfg.get("weakest", 5)))


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


def _doc_limit(name: str, raw) -> int | None:
    if raw is None or raw == "all":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise UserError(f"{name}={raw!r} is not allowed: use a whole number of documents >= 1, or null for all "
                        f"(lm-eval would read a number below 1 as a fraction)")
    return int(value)


def eval_settings(eval_cfg) -> EvalSettings:
    """``cfg.eval`` (conf/eval/default.yaml) -> EvalSettings, every mistake as a one-line UserError."""
    cfg = plain(eval_cfg)
    families = cfg.get("tasks", "all")
    if families in (None, "all"):
        families = list(TASK_FAMILIES)
    elif isinstance(families, str):
        families = [families]
    if not families or not all(isinstance(f, str) and f for f in families):
        raise UserError(f"eval.tasks={families} is not allowed: use all or a list of {', '.join(TASK_FAMILIES)} "
                        f"and lm-eval task or group names")
    include_path = cfg.get("include_path")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise UserError(f"eval.include_path={include_path} is not a directory of lm-eval task YAMLs")
    task_langs = {str(k): str(v) for k, v in (cfg.get("task_langs") or {}).items()}
    unknown = sorted(set(task_langs.values()) - set(LANG_ORDER))
    if unknown:
        raise UserError(f"eval.task_langs names unknown language(s) {unknown}: use codes of {' '.join(LANG_ORDER)}")
    langs = cfg.get("langs", "all")
    if langs in (None, "all"):
        langs = None
    else:
        langs = [langs] if isinstance(langs, str) else [str(c) for c in langs]
        unknown = [c for c in langs if c not in LANG_ORDER]
        if unknown:
            raise UserError(f"eval.langs has unknown language(s) {unknown}: use all or codes of {' '.join(LANG_ORDER)}")
        langs = tuple(langs)
    limits = {str(k): _doc_limit(f"eval.limits.{k}", v) for k, v in (cfg.get("limits") or {}).items()}
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
                        limit=_doc_limit("eval.limit", cfg.get("limit")), limits=limits,
                        batch_size=positive_int("eval.batch_size", cfg.get("batch_size"), allow_none=True),
                        mt_prompt=mt_prompt, flores_split=split, bootstrap=int(cfg.get("bootstrap", 1000)),
                        seed=int(cfg.get("seed", 0)),
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


def given_prompts(raw, path) -> dict[str, list[str]] | None:
    """``generate.prompts``: {lang: [prompt, ...]} (or a plain list, read as English prompts)."""
    if raw is None:
        return None
    if path is not None:
        raise UserError("generate.prompts and generate.prompts_file are both set: give one of them")
    prompts = {"en": raw} if isinstance(raw, list) else raw
    if not isinstance(prompts, dict) or not prompts or not all(
            isinstance(v, list) and v and all(isinstance(p, str) for p in v) for v in prompts.values()):
        raise UserError("generate.prompts must be {lang: [prompt, ...]} or a list of English prompts")
    data.languages(list(prompts))
    return {str(k): list(v) for k, v in prompts.items()}


def generate_settings(generate_cfg) -> GenerateSettings:
    """``cfg.generate`` (conf/generate/default.yaml), every mistake as a one-line UserError."""
    cfg = plain(generate_cfg)
    sources = cfg.get("sources") or ["en"]
    data.languages(list(sources))
    path = cfg.get("prompts_file")
    if path is not None and not Path(path).expanduser().is_file():
        raise UserError(f"generate.prompts_file={path} is not a file: give a YAML file {{lang: [prompt, ...]}}")
    max_repetition = float(cfg.get("max_repetition", 0.5))
    if not 0 <= max_repetition <= 1:
        raise UserError(f"generate.max_repetition={max_repetition} is not allowed: use a share in [0, 1]")
    return GenerateSettings(
        sources=tuple(str(c) for c in sources), n_prompts=positive_int("generate.n_prompts", cfg.get("n_prompts", 16)),
        prompt_words=positive_int("generate.prompt_words", cfg.get("prompt_words", 6)),
        first_sentence=int(cfg.get("first_sentence", 0)), prompts_file=None if path is None else str(path),
        prompts=given_prompts(cfg.get("prompts"), path),
        max_new_tokens=positive_int("generate.max_new_tokens", cfg.get("max_new_tokens", 25)),
        repetition_n=positive_int("generate.repetition_n", cfg.get("repetition_n", 4)), max_repetition=max_repetition,
        domain=prompt_domain("generate.domain", cfg.get("domain", "news")))


def prompt_domain(name: str, raw) -> str:
    if raw not in PROMPT_DOMAINS:
        raise UserError(f"{name}={raw} is not a prompt domain: use one of {', '.join(PROMPT_DOMAINS)}")
    return str(raw)


# --- the job ---------------------------------------------------------------------------------------------

def threads(raw) -> int | None:
    """``threads``: CPU threads for torch (null: torch's default)."""
    return positive_int("threads", raw, allow_none=True)


def validate(cfg, stages) -> None:
    """Every check a job's config can fail without loading a model (``dry_run=true`` runs it too).

    Raises UserError (one line). Layer ranges are checked against the model's config when it is on disk.
    """
    if cfg.stage not in stages:
        raise UserError(f"stage={cfg.stage} is not one of {', '.join(stages)}")
    factor = parse_factor(cfg.factor)
    threads(cfg.get("threads"))
    if cfg.get("scoring_processes", "auto") != "auto":
        positive_int("scoring_processes", cfg.get("scoring_processes"))
    identify_settings(cfg.identify)
    lss_settings(cfg.lss)
    lss_settings(search_config(cfg.lss))
    evaluated = eval_settings(cfg.eval)
    if cfg.stage == "downstream":
        from lsn_exp.taskindex import check_lm_eval_tasks

        check_lm_eval_tasks([n for n in evaluated.families if n not in TASK_FAMILIES], evaluated.include_path,
                            list(TASK_FAMILIES))
    generated = generate_settings(cfg.get("generate"))
    if cfg.stage == "compare" or cfg.get("method_name") == "best":  # the methods, ranges and search sample
        from lsn_exp.coefsearch import check_compare

        compare_cfg = plain(cfg.compare)
        found = check_compare(compare_cfg, PROMPT_DOMAINS)
        check_blocks(generated, data.resolve_root(plain(cfg.get("data") or {}).get("root")), compare_cfg["domains"],
                     found, compare_cfg)
    if cfg.get("prompt") is not None and cfg.prompt.mode not in data.PROMPT_MODES:
        raise UserError(f"prompt.mode={cfg.prompt.mode} is not allowed: use one of {', '.join(data.PROMPT_MODES)}")
    if cfg.stage == "downstream" and cfg.get("prompt") is not None and cfg.prompt.mode != "none":
        raise UserError("prompt baselines are scored on LSS and generation, not on downstream tasks: "
                        "use prompt.mode=none with stage=downstream")
    target = str(cfg.lang.code)
    patch_cfg = plain(cfg.patch)
    searched = factor.kind == "best" or cfg.stage == "factor_search"
    if factor.kind == "best":  # the winner brings op/value/stat; the rest of the patch must still parse
        patch_cfg.update(op=None, value=None, stat=None)
        factor = parse_factor(1)
    spec = PatchSpec.from_config(patch_cfg, factor, target)
    steer = SteerSpec.from_config(plain(cfg.get("steer")), target)
    from lsn_exp.models import model_layers

    n_layers = model_layers(cfg.model, cfg.get("cache_dir"))
    for name, layers in (("patch.layers", spec.layers), ("steer.layers", steer.layers)):
        if layers is not None and n_layers is not None:
            check_layers(layers, n_layers, name)
    if searched:  # the grid shapes the search and the key factor=best looks up
        from lsn_exp.search import grid_specs  # search imports this module

        grid_specs(cfg.lss, cfg.patch, target)
