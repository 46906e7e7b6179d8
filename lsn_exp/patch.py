"""Stage 2: amplify the target language's neurons (the paper's intervention).

Hook point, TransformerLens style, one per decoder layer l:
    blocks.{l}.mlp.hook_gate = act_fn(gate_proj(x))            [batch, pos, d_ff]
    mlp(x) = down_proj(hook_gate * up_proj(x))                    neuron j <-> input column j of down_proj

A patch rewrites hook_gate[..., j] for the target language's neurons j at the selected layers, at every
position and for every row, in scoring and in generation (KV-cache decode steps included):
  mul c, set 0       weight edit: down_proj.weight[:, j] *= c (0). Exact for an element-wise factor, free
                     at run time; the original columns are kept and restored bit for bit.
  set v, add v       one forward hook per layer on act_fn; v a number or the neuron's stored value (pmax,
                     pmedian) for the target, as precomputed index and value tensors; no host sync.
  stat (test time)   v = coef * statistic of the sample's own real tokens x all d_ff neurons of the layer
                     (percentile: the coef-th percentile), computed in the same hook, per sample.
torch is imported lazily: job.py imports this module for ``parse_factor`` before deciding to load anything.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lsn_exp.errors import UserError

if TYPE_CHECKING:
    import torch

    from lsn_exp.identify import NeuronArtifact
    from lsn_exp.models import ModelHandle

PATCHED_VALUES = ("pmax", "pmedian")
OPS = ("mul", "set", "add")
STATS = ("mean", "std", "iqr", "mad", "median", "max", "percentile")
NEURON_SETS = ("lape", "baseline", "random")  # as lsn_exp.identify.NEURON_SETS (a test keeps them equal)


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


# --- the spec: what to do, validated without the model ---------------------------------------------

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
                   others_value=_number("patch.others_value", others_value))

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
            label += f":others:{self.others_op}={self.others_value:g}"
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


def parse_layers(raw) -> tuple[int, ...] | None:
    """None/"all" -> None; 3 -> (3,); "2-5" -> (2, 3, 4, 5) (inclusive); [0, 7] or "0,7" -> (0, 7)."""
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
        raise UserError(f"patch.layers={raw!r} is not a layer selection: use null (all), a range like "
                        f"2-5, or a list like [0,7]") from None
    if not layers:
        raise UserError(f"patch.layers={raw!r} selects no layer: use null (all), a range like 2-5, or a list")
    return tuple(sorted(set(layers)))


def _layers_label(layers: tuple[int, ...]) -> str:
    contiguous = len(layers) > 1 and layers == tuple(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))


# --- test-time statistics: per sample, over its real tokens x all neurons of one layer ---------------

def sample_statistic(gate: torch.Tensor, real: torch.Tensor, stat: str, coef: float) -> torch.Tensor:
    """float32 [B]: ``coef * stat`` of ``gate`` [B, T, d_ff] over each row's real positions ``real`` [B, T].

    Padding never enters a row's statistic, and rows never mix. Quantiles interpolate linearly like
    torch.quantile (median = 50th percentile); std is the unbiased one, like torch.std; mad is the
    median absolute deviation from the median. Everything stays on the device: no host sync.
    """
    import torch

    batch = gate.shape[0]
    x = gate.float().reshape(batch, -1)  # [B, T*d_ff]
    keep = real.bool()[:, :, None].expand(gate.shape).reshape(batch, -1)  # [B, T*d_ff]
    n = keep.sum(dim=1).clamp(min=1)  # [B] real values per row
    if stat == "mean":
        value = torch.where(keep, x, 0.0).sum(dim=1) / n
    elif stat == "std":
        mean = torch.where(keep, x, 0.0).sum(dim=1) / n
        squares = torch.where(keep, (x - mean[:, None]) ** 2, 0.0).sum(dim=1)
        value = (squares / (n - 1).clamp(min=1)).sqrt()
    elif stat == "max":
        value = torch.where(keep, x, float("-inf")).amax(dim=1)
    elif stat == "median":
        value = _masked_quantile(x, keep, n, 0.5)
    elif stat == "percentile":
        return _masked_quantile(x, keep, n, coef / 100.0)
    elif stat == "iqr":
        value = _masked_quantile(x, keep, n, 0.75) - _masked_quantile(x, keep, n, 0.25)
    elif stat == "mad":
        median = _masked_quantile(x, keep, n, 0.5)
        value = _masked_quantile((x - median[:, None]).abs(), keep, n, 0.5)
    else:
        raise UserError(f"patch.stat={stat} is not allowed: use one of {', '.join(STATS)}")
    return coef * value


def _masked_quantile(x: torch.Tensor, keep: torch.Tensor, n: torch.Tensor, q: float) -> torch.Tensor:
    """[B]: the q-quantile of each row's kept values; padding sorts last as +inf, so ranks < n are real."""
    import torch

    ordered = torch.where(keep, x, float("inf")).sort(dim=1).values  # [B, N]
    position = (n - 1).to(torch.float32) * q  # [B], fractional rank
    low, high = position.floor().long(), position.ceil().long()
    low_value = ordered.gather(1, low[:, None])[:, 0]
    high_value = ordered.gather(1, high[:, None])[:, 0]
    return low_value + (high_value - low_value) * (position - low)


# --- the patch: a context manager ------------------------------------------------------------------

@dataclass
class _Action:
    """One op on some neurons of one layer's hook_gate."""

    idx: torch.Tensor  # int64 [n] on the layer's device
    op: str  # mul | set | add
    values: torch.Tensor | None  # [n] in the activation dtype; None: the per-sample statistic


@dataclass
class _LayerPlan:
    layer: int
    edit_idx: torch.Tensor | None = None  # int64 [m]: down_proj columns to scale
    edit_scale: torch.Tensor | None = None  # float32 [m]
    actions: list[_Action] | None = None  # run by the layer's hook, in order


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the Patch active on it


def active_patch(model) -> Patch | None:
    """The Patch currently installed on ``model`` (None when the model is unpatched)."""
    return _ACTIVE.get(model)


class Patch:
    """``with Patch(handle, artifact, spec): ...`` patches the model inside the block, restores it on exit.

    ``weight_edit=False`` runs multiply and set-0 in the hook instead (for tests and benchmarks).
    """

    def __init__(self, handle: ModelHandle, artifact: NeuronArtifact, spec: PatchSpec, *,
                 weight_edit: bool = True) -> None:
        self.handle, self.artifact, self.spec, self.weight_edit = handle, artifact, spec, weight_edit
        adapter = handle.adapter
        if (artifact.n_layers, artifact.d_ff) != (adapter.n_layers, adapter.d_ff):
            raise UserError(f"the neuron artifact has {artifact.n_layers} layers x {artifact.d_ff} neurons but the "
                            f"model has {adapter.n_layers} x {adapter.d_ff}: identify neurons for this model first")
        if spec.neuron_set not in artifact.masks:
            raise UserError(f"patch.neuron_set={spec.neuron_set} is not in the artifact: use one of "
                            f"{', '.join(artifact.masks)}")
        if spec.target not in artifact.languages:
            raise UserError(f"lang={spec.target} has no neurons in the artifact: recorded languages are "
                            f"{' '.join(artifact.languages)}")
        self.layers = _resolve_layers(spec.layers, adapter.n_layers)
        self.neurons_per_layer = [0] * adapter.n_layers  # target neurons patched in each layer
        self.others_per_layer = [0] * adapter.n_layers
        self._plans = [plan for plan in (self._plan_layer(layer) for layer in self.layers) if plan is not None]
        self._uses_stat = any(a.values is None for p in self._plans for a in p.actions or [])
        self._handles: list = []
        self._saved_columns: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, idx, original [d_model, m])
        self._attention_mask: torch.Tensor | None = None  # [B, T_total] of the current decoder call
        self._past_len = 0  # cached positions before the current decoder call
        self._stats: dict[int, torch.Tensor] = {}  # layer -> [B] prefill statistic

    # -- planning (host side, once) --

    @property
    def reads_whole_rows(self) -> bool:
        """A test-time statistic is taken over each row's real tokens: scoring must feed whole rows."""
        return self._uses_stat

    @property
    def is_noop(self) -> bool:
        """Nothing to install: empty neuron set, factor 1, add 0, or no selected layer with neurons."""
        return not self._plans

    def summary(self) -> dict[str, Any]:
        """For run records: the label, neuron counts and how the patch runs."""
        edits = sum(p.edit_idx is not None for p in self._plans)
        hooks = sum(bool(p.actions) for p in self._plans)
        return {"patch": self.spec.describe(), "layers": list(self.layers),
                "neurons": sum(self.neurons_per_layer), "neurons_per_layer": list(self.neurons_per_layer),
                "others_neurons": sum(self.others_per_layer), "weight_edit_layers": edits, "hook_layers": hooks}

    def _plan_layer(self, layer: int) -> _LayerPlan | None:
        import torch

        spec, artifact = self.spec, self.artifact
        weight = self.handle.adapter.down_projs[layer].weight
        masks = artifact.masks[spec.neuron_set][:, layer].bool()  # [K, d_ff]
        k = artifact.lang_index(spec.target)
        target = masks[k]
        others = masks[torch.arange(masks.shape[0]) != k].any(dim=0) & ~target  # a shared neuron is the target's
        self.neurons_per_layer[layer] = int(target.sum())
        self.others_per_layer[layer] = int(others.sum()) if spec.others_op is not None else 0
        groups = [(target, spec.op, spec.value, spec.source, spec.stat)]
        if spec.others_op is not None:
            groups.append((others, spec.others_op, spec.others_value, None, None))
        plan = _LayerPlan(layer, actions=[])
        edit_idx, edit_scale = [], []
        for mask, op, value, source, stat in groups:
            idx = mask.nonzero().flatten()  # int64 [n], CPU
            if idx.numel() == 0 or _is_identity(op, value, source, stat):
                continue
            values = None if stat is not None else self._values(idx, value, source, layer)  # float32 [n]
            if self.weight_edit and values is not None and (op == "mul" or (op == "set" and value == 0)):
                edit_idx.append(idx)
                edit_scale.append(values if op == "mul" else torch.zeros_like(values))
            else:
                plan.actions.append(_Action(idx.to(weight.device), op, None if values is None else
                                            values.to(device=weight.device, dtype=weight.dtype)))
        if edit_idx:
            plan.edit_idx = torch.cat(edit_idx).to(weight.device)
            plan.edit_scale = torch.cat(edit_scale).to(weight.device)
        return plan if plan.actions or plan.edit_idx is not None else None

    def _values(self, idx: torch.Tensor, value: float | None, source: str | None, layer: int) -> torch.Tensor:
        """float32 [n]: the constant, or each neuron's stored value for the target."""
        import torch

        if source is None:
            return torch.full((idx.numel(),), float(value), dtype=torch.float32)
        stored = self.artifact.p_max if source == "pmax" else self.artifact.p_median  # [K, L, d_ff]
        return stored[self.artifact.lang_index(self.spec.target), layer, idx].to(torch.float32)

    # -- install / remove --

    def __enter__(self) -> Patch:
        if self._handles or self._saved_columns:
            raise RuntimeError("this Patch is already active; it cannot be entered twice at once")
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _install(self) -> None:
        import torch

        adapter = self.handle.adapter
        if self._uses_stat:  # the statistics need each call's attention mask and cache length
            self._handles.append(adapter.decoder.register_forward_pre_hook(self._capture_call, with_kwargs=True))
        for plan in self._plans:
            if plan.edit_idx is not None:
                weight = adapter.down_projs[plan.layer].weight  # [d_model, d_ff]
                with torch.no_grad():
                    original = weight[:, plan.edit_idx].clone()  # [d_model, m]
                    self._saved_columns.append((plan.layer, plan.edit_idx, original))
                    weight[:, plan.edit_idx] = (original.float() * plan.edit_scale).to(weight.dtype)
            if plan.actions:
                self._handles.append(adapter.act_fns[plan.layer].register_forward_hook(self._make_hook(plan)))
        _ACTIVE[self.handle.model] = self

    def _remove(self) -> None:
        import torch

        if _ACTIVE.get(self.handle.model) is self:
            del _ACTIVE[self.handle.model]
        for handle in self._handles:
            handle.remove()
        self._handles = []
        with torch.no_grad():
            for layer, idx, original in reversed(self._saved_columns):
                self.handle.adapter.down_projs[layer].weight[:, idx] = original  # bit-for-bit restore
        self._saved_columns = []
        self._attention_mask, self._past_len, self._stats = None, 0, {}

    # -- run time (no host sync: shapes and Python ints only) --

    def _capture_call(self, module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the decoder: remember the 2D attention mask and how many positions are cached."""
        import torch

        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
            raise RuntimeError("patch.stat needs a 2D attention_mask [batch, positions]; got a prepared "
                               f"{type(mask).__name__} mask (static/compiled cache?): use the default dynamic cache")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._attention_mask = mask
        self._past_len = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0  # Python int

    def _make_hook(self, plan: _LayerPlan):
        import torch

        actions, layer = plan.actions, plan.layer
        needs_stat = any(a.values is None for a in actions)

        def hook(module, args, gate: torch.Tensor) -> torch.Tensor:  # gate: hook_gate [B, T, d_ff]
            stat = self._statistic(layer, gate) if needs_stat else None  # [B] float32
            if torch.is_grad_enabled():  # keep autograd's saved tensors intact
                gate = gate.clone()
            for action in actions:
                _apply(gate, action, stat)
            return gate

        return hook

    def _statistic(self, layer: int, gate: torch.Tensor) -> torch.Tensor:
        """[B]: this layer's per-sample statistic, computed on the prefill and reused on cached steps.

        A KV-cache decode step sees only the new position(s); recomputing the statistic over them would
        make it depend on how generation is chunked. Each sample keeps the statistic of its own prompt
        (its real prefill tokens) instead. Beam search, which reorders rows, is not supported.
        """
        import torch

        batch, positions = gate.shape[:2]
        if self._past_len > 0:
            stat = self._stats.get(layer)
            if stat is None or stat.shape[0] != batch:
                raise RuntimeError(f"patch.stat: no prefill statistic for layer {layer} and batch {batch}; "
                                   "enter the patch before generation starts (beam search is not supported)")
            return stat
        mask = self._attention_mask
        if mask is None:  # no mask: every position is real
            real = torch.ones(batch, positions, dtype=torch.bool, device=gate.device)
        else:
            real = mask[:, -positions:].to(device=gate.device, dtype=torch.bool)  # [B, T]
        stat = sample_statistic(gate, real, self.spec.stat, self.spec.coef)
        self._stats[layer] = stat
        return stat


def _apply(gate: torch.Tensor, action: _Action, stat: torch.Tensor | None) -> None:
    """In place on gate [B, T, d_ff]: op the neurons ``action.idx`` with [n] values or the [B] statistic."""
    value = action.values if action.values is not None else stat.to(gate.dtype)[:, None, None]  # [n] | [B,1,1]
    if action.op == "set":
        gate[..., action.idx] = value
    elif action.op == "add":
        gate[..., action.idx] = gate[..., action.idx] + value
    else:
        gate[..., action.idx] = gate[..., action.idx] * value


def _is_identity(op: str, value: float | None, source: str | None, stat: str | None) -> bool:
    """mul 1 and add 0 leave every activation as it is: install nothing, stay bit-identical."""
    return source is None and stat is None and ((op == "mul" and value == 1) or (op == "add" and value == 0))


def check_layers(layers: tuple[int, ...], n_layers: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"patch.layers has layer {bad[0]} out of range: this model has {n_layers} layers, "
                        f"use 0..{n_layers - 1}")


def _resolve_layers(layers: tuple[int, ...] | None, n_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_layers))
    check_layers(layers, n_layers)
    return layers
