"""What an intervention is, parsed and checked without torch or a model: the factor, the neuron patch, the
steering vector and their pairing (``Intervention``), and the layer and number parsers they share.

The runtime that applies them lives in ``lsn_exp.patch`` (neurons) and ``lsn_exp.steer`` (vectors); settings and
preflight validate with this module alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lsn_exp.data import prompt_prefix
from lsn_exp.errors import UserError

PATCHED_VALUES = ("pmax", "pmedian")
OPS = ("mul", "set", "add")
STATS = ("mean", "std", "iqr", "mad", "median", "max", "percentile")  # test-time statistics (lsn_exp.teststat)
NEURON_SETS = ("lape", "baseline", "random")  # LAPE, the language-activated baseline, a random control


@dataclass(frozen=True)
class PatchSpec:
    """What a patch does to the target language's neurons (and optionally to the other languages')."""

    target: str  # language code, e.g. "id"
    neuron_set: str = "lape"  # lape | baseline | random
    op: str = "mul"  # mul | set | add
    value: float | None = None  # the number for op, when neither source nor stat is given
    source: str | None = None  # pmax | pmedian: each neuron's stored value for the target
    stat: str | None = None  # test time: mean | std | iqr | mad | median | max | percentile
    coef: float = 1.0  # value = coef * stat; for percentile, coef is the percentile (0..100)
    layers: tuple[int, ...] | None = None  # None: all layers
    others_op: str | None = None  # None: leave the other languages' neurons alone; else mul | set | add
    others_value: float | None = None
    others_langs: tuple[str, ...] | None = None  # None: every other recorded language; e.g. ("en",)

    def __post_init__(self) -> None:
        if self.layers is not None:  # any iterable of ints -> sorted unique tuple
            object.__setattr__(self, "layers", parse_layers(list(self.layers)))
        _check_choice("patch.neuron_set", self.neuron_set, NEURON_SETS)
        _check_choice("patch.op", self.op, OPS)
        if self.stat is not None:
            _check_choice("patch.stat", self.stat, STATS)
        if self.source is not None:
            _check_choice("patch source (factor)", self.source, PATCHED_VALUES)
        given = [name for name in ("value", "source", "stat") if getattr(self, name) is not None]
        if len(given) != 1:
            raise UserError(f"a patch needs exactly one of value, source, stat (got {', '.join(given) or 'none'}):"
                            f" e.g. factor=5, factor=pmax, patch.op=set patch.value=0 or patch.stat=max")
        if self.stat == "percentile" and not 0 <= self.coef <= 100:
            raise UserError(f"patch.coef={self.coef:g} is not a percentile: use 0..100 with patch.stat=percentile")
        if self.others_op is not None:
            _check_choice("patch.others_op", self.others_op, OPS)
            if self.others_value is None:
                raise UserError(f"patch.others_op={self.others_op} needs a number: patch.others_value=0, say")
        if self.others_langs is not None:
            from lsn_exp.data import languages

            languages(self.others_langs)  # unknown codes: one line

    @classmethod
    def from_config(cls, patch_cfg, factor: Factor, target: str) -> PatchSpec:
        """``cfg.patch`` + ``factor``: a number multiplies, pmax|pmedian sets; patch.op/value/stat override."""
        op, value, stat = patch_cfg.get("op"), patch_cfg.get("value"), patch_cfg.get("stat")
        if op is None and value is not None:
            raise UserError(f"patch.value={value} needs an op: add patch.op=set, patch.op=mul or patch.op=add")
        if op is None:
            op = "set" if stat is not None or factor.kind != "mul" else "mul"
        source = None
        if value is None and stat is None:  # the value comes from the factor
            value, source = (factor.value, None) if factor.kind == "mul" else (None, factor.kind)
        others_value = patch_cfg.get("others_value")
        return cls(target=str(target), neuron_set=str(patch_cfg.get("neuron_set", "lape")), op=str(op),
                   value=_number("patch.value", value), source=source,
                   stat=None if stat is None else str(stat), coef=_number("patch.coef", patch_cfg.get("coef", 1.0)),
                   layers=parse_layers(patch_cfg.get("layers")), others_op=patch_cfg.get("others_op"),
                   others_value=_number("patch.others_value", others_value),
                   others_langs=None if patch_cfg.get("others_langs") is None else tuple(patch_cfg.get("others_langs")))

    def describe(self) -> str:
        """Short label, e.g. ``id:lape:set=pmax``, ``id:lape:mul=5@L2-5``, ``id:lape:add=max*2:others:set=0``."""
        if self.stat == "percentile":
            amount = f"p{self.coef:g}"
        elif self.stat is not None:
            amount = self.stat if self.coef == 1 else f"{self.stat}*{self.coef:g}"
        else:
            amount = self.source or f"{self.value:g}"
        label = f"{self.target}:{self.neuron_set}:{self.op}={amount}"
        if self.layers is not None:
            label += f"@L{_layers_label(self.layers)}"
        if self.others_op is not None:
            langs = "" if self.others_langs is None else f"({','.join(self.others_langs)})"
            label += f":others{langs}:{self.others_op}={self.others_value:g}"
        return label


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name}={value} is not allowed: use one of {', '.join(allowed)}")


def _number(name: str, raw) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{name}={raw!r} is not a finite number")
    return value


def parse_layers(raw, name: str = "patch.layers") -> tuple[int, ...] | None:
    """None/"all" -> None; 3 -> (3,); "2-5" -> (2, 3, 4, 5) (inclusive); [0, 7] or "0,7" -> (0, 7). ``name``: the
    setting, for messages."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("all", "")):
        return None
    try:
        if isinstance(raw, str) and "-" in raw.strip().lstrip("-"):
            first, last = raw.split("-", 1)
            layers = range(int(first), int(last) + 1)
        elif isinstance(raw, str):
            layers = [int(part) for part in raw.split(",")]
        elif isinstance(raw, int) and not isinstance(raw, bool):
            layers = [raw]
        else:
            layers = [int(layer) for layer in raw]
    except (TypeError, ValueError):
        raise UserError(f"{name}={raw!r} is not a layer selection: use null (all), a range like "
                        f"2-5, or a list like [0,7]") from None
    if not layers:
        raise UserError(f"{name}={raw!r} selects no layer: use null (all), a range like 2-5, or a list")
    if min(layers) < 0:
        raise UserError(f"{name}={raw!r} has a negative layer: layers count from 0")
    return tuple(sorted(set(layers)))


def _layers_label(layers: tuple[int, ...]) -> str:
    contiguous = len(layers) > 1 and layers == tuple(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))


def check_layers(layers: tuple[int, ...] | None, n_layers: int, name: str = "patch.layers") -> tuple[int, ...]:
    """The selected layers (None: all), each checked against the model's layer count."""
    bad = [layer for layer in layers or () if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"{name} has layer {bad[0]} out of range: this model has {n_layers} layers, "
                        f"use 0..{n_layers - 1}")
    return tuple(range(n_layers)) if layers is None else layers


# --- config nodes and the factor ----------------------------------------------------------------------------

def plain(cfg) -> dict:
    """A config node (DictConfig or mapping) as a plain dict."""
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


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


# --- the steering vector and the pairing --------------------------------------------------------------------

# none: alpha multiplies the raw difference of means; unit: v / |v| (alpha in residual units, as CLaS-Bench);
# resid_norm: v / |v| x the layer's mean token residual norm (averaged over languages): alpha is a share of it
SCALES = ("none", "unit", "resid_norm")


@dataclass(frozen=True)
class SteerSpec:
    """Add alpha x the target's DiffMean vector to the residual stream after each chosen layer."""

    target: str
    alpha: float = 0.0
    layers: tuple[int, ...] | None = None  # None: all layers
    scale: str = "resid_norm"

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise UserError(f"steer.alpha={self.alpha} is not a finite number")
        if self.scale not in SCALES:
            raise UserError(f"steer.scale={self.scale} is not allowed: use one of {', '.join(SCALES)}")

    @classmethod
    def from_config(cls, steer_cfg, target: str) -> SteerSpec:
        cfg = dict(steer_cfg or {})
        try:
            alpha = float(cfg.get("alpha", 0.0))
        except (TypeError, ValueError):
            raise UserError(f"steer.alpha={cfg.get('alpha')!r} is not a number") from None
        return cls(target=str(target), alpha=alpha, layers=parse_layers(cfg.get("layers"), "steer.layers"),
                   scale=str(cfg.get("scale", "resid_norm")))

    @property
    def is_noop(self) -> bool:
        return self.alpha == 0

    def describe(self) -> str:
        label = f"diffmean*{self.alpha:g}" + ("" if self.scale == "none" else f"({self.scale})")
        return label + ("" if self.layers is None else f"@L{','.join(map(str, self.layers))}")


@dataclass(frozen=True)
class Intervention:
    """A neuron patch, an optional steering vector and an optional prompt prefix toward one target language.
    The prefix (a prompt baseline, ``data.prompt_prefix``) changes only the prompts: LSS and generation score
    prefixed prompts against the plain unpatched ones."""

    patch: PatchSpec
    steer: SteerSpec | None = None
    prompt: str = "none"  # the prompt baseline's mode (data.PROMPT_MODES)
    prefix: str = ""  # its text, put before every prompt

    @classmethod
    def from_settings(cls, target: str, factor: Factor, patch, steer=None, prompt=None,
                      data_root: Path | None = None) -> Intervention:
        """The one way to build an intervention: the ``patch`` / ``steer`` / ``prompt`` settings (config nodes
        or dicts shaped as conf/patch, conf/steer, conf/prompt) and ``factor``, toward ``target``; a priming
        prompt's sentence is read from ``data_root``."""
        prompt = plain(prompt)
        mode = str(prompt.get("mode", "none"))
        prefix = prompt_prefix(mode, target, data_root, int(prompt.get("sentence", 0)))
        return cls(PatchSpec.from_config(plain(patch), factor, target), SteerSpec.from_config(plain(steer), target),
                   mode, prefix)

    @property
    def target(self) -> str:
        return self.patch.target

    def describe(self) -> str:
        label = self.patch.describe()
        if self.steer is not None and not self.steer.is_noop:
            label += f"+{self.steer.describe()}"
        return label + ("" if self.prompt == "none" else f"+prompt:{self.prompt}")
