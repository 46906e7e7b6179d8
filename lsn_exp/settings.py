"""Typed settings of each stage, parsed from the Hydra config.

Each mistake is a ``UserError``: one line naming the fix. This module imports no stage and no torch or lm-eval;
``lsn_exp.preflight.validate`` composes these parsers with each stage's own checks before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, checks, lid
from lsn_exp.checks import n_facts, positive_int, rate, whole
from lsn_exp.data import LANG_ORDER, MT_PROMPTS
from lsn_exp.errors import UserError
from lsn_exp.prompts import DOMAINS as PROMPT_DOMAINS
from lsn_exp.specs import plain
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
    cfg = with_defaults("lss", lss_cfg)
    tol = cfg["tol"]
    if tol is None or str(tol).lower() == "auto":
        tol = default_tol(dtype or "float32")
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise UserError(f"lss.tol={tol!r} is not a number or auto") from None
    if not 0 <= tol < math.inf:
        raise UserError(f"lss.tol={tol} is not allowed: use auto or a small positive number of nats, e.g. 1e-3")
    return LssSettings(n_facts=n_facts(f"{key}.n_facts", cfg["n_facts"]), seed=whole("lss.seed", cfg["seed"]),
                       sources=checks.lss_langs(cfg["sources"], f"{key}.sources"),
                       targets=checks.lss_langs(cfg["targets"], f"{key}.targets"), tol=tol,
                       batch_size=positive_int("lss.batch_size", cfg["batch_size"], allow_none=True),
                       bootstrap=whole("lss.bootstrap", cfg["bootstrap"]), weakest=whole("lss.weakest", cfg["weakest"]))


def search_config(lss_cfg) -> dict:
    """``cfg.lss`` as the factor search scores it: ``lss.search``'s n_facts / sources / targets over lss's."""
    cfg = plain(lss_cfg)
    search = cfg.pop("search", None) or {}
    cfg.update({k: search[k] for k in SEARCH_KEYS if search.get(k) is not None})
    return cfg


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
        raise UserError(f"eval.limits names unknown tasks {bad}: use {', '.join(TASK_FAMILIES)} or a task of eval.tasks")
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
