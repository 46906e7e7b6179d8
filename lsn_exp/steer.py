"""Steering vectors: DiffMean on the residual stream, alone or with a neuron patch.

For target t and layer l, v_l = mean residual stream after layer l over t's recorded FLORES tokens minus the
average of the other recorded languages' means (``NeuronSet.diffmean``; recorded in the same pass as the
neuron statistics, padding and prefix excluded). A steer adds alpha * v_l (scaled, see ``SCALES``) to the
``resid_post`` site of each chosen layer, at every position, in scoring and in generation; alpha = 0 installs
nothing, so it is bit-identical to no intervention.

``Intervention`` pairs a PatchSpec (neurons) with an optional SteerSpec (vector); ``intervene`` applies both as
one context manager that restores the model bit for bit on exit. The specs themselves live in ``lsn_exp.specs``.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING

from lsn_exp.patch import Patch
from lsn_exp.results import PatchSummary
from lsn_exp.specs import Intervention, PatchSpec, SteerSpec, check_layers

if TYPE_CHECKING:
    from lsn_exp.models import ModelHandle
    from lsn_exp.neuronset import NeuronSet

log = logging.getLogger(__name__)


def steering_vectors(neurons: NeuronSet, spec: SteerSpec, n_layers: int) -> dict:
    """layer -> float32 [d_model]: alpha x the scaled DiffMean vector of the target, for every chosen layer."""
    import torch

    layers = check_layers(spec.layers, n_layers, "steer.layers")
    v = neurons.diffmean(spec.target)  # [L, d_model]
    out = {}
    for layer in layers:
        vector = v[layer].to(torch.float32)
        if spec.scale != "none":
            vector = vector / vector.norm().clamp(min=1e-12)
        if spec.scale == "resid_norm":
            vector = vector * neurons.resid_norm[:, layer].mean()
        out[layer] = spec.alpha * vector
    return out


class Steer:
    """``with Steer(handle, neurons, spec): ...`` adds the vectors inside the block, removes every hook on exit.

    ``norm_ratio``: per layer, the mean over steered positions of ||(h + αv) − h|| / ||αv||, h + αv as the model's
    dtype computed it: in bf16 a vector far smaller than the residual partly rounds away (one warning per block)."""

    def __init__(self, handle: ModelHandle, neurons: NeuronSet, spec: SteerSpec):
        self.handle, self.spec = handle, spec
        self.vectors = {} if spec.is_noop else steering_vectors(neurons, spec, handle.adapter.n_layers)
        self._hooks: list = []
        self._tally = {layer: [0.0, 0] for layer, v in self.vectors.items() if v.norm() > 0}  # [ratio sum, positions]
        self._start: dict = {}

    def __enter__(self) -> Steer:
        sites = self.handle.adapter.site("resid_post")
        weight = self.handle.adapter.site("mlp.down")[0].weight
        self._start = {layer: list(tally) for layer, tally in self._tally.items()}
        for layer, vector in self.vectors.items():
            added = vector.to(device=weight.device, dtype=weight.dtype)
            self._hooks.append(sites[layer].register_forward_hook(
                _adder(added, float(vector.norm()), self._tally.get(layer))))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        ratios = _ratios(self._tally, self._start)  # this block's positions only
        if ratios and min(ratios.values()) < MIN_NORM_RATIO:
            layer = min(ratios, key=ratios.get)
            log.warning("steer %s: layer %d adds %.2f of the vector's norm in %s (||(h + αv) − h|| / ||αv||; %d of %d "
                        "layers below %.1f): α is too small for the residual's precision; search α on the device "
                        "and dtype that steer, or steer in float32 (model.dtype=float32)", self.spec.describe(),
                        layer, ratios[layer], str(self.handle.model.dtype).replace("torch.", ""),
                        sum(r < MIN_NORM_RATIO for r in ratios.values()), len(ratios), MIN_NORM_RATIO)

    @property
    def norm_ratio(self) -> dict[int, float]:
        """Layer -> mean realised / requested norm of the added vector over every position steered so far."""
        return _ratios(self._tally, {})


MIN_NORM_RATIO = 0.9  # below it a layer's vector has lost more than a tenth of its norm to rounding: warned


def _ratios(tally: dict, start: dict) -> dict[int, float]:
    """Layer -> mean ratio over the positions counted since ``start`` (one host sync per layer)."""
    begun = {layer: start.get(layer, [0.0, 0]) for layer in tally}
    return {layer: float(total - begun[layer][0]) / (n - begun[layer][1])
            for layer, (total, n) in tally.items() if n > begun[layer][1]}


def _adder(vector, requested: float, tally: list | None):
    """The hook adding ``vector``; it adds ||(h + v) − h|| / ``requested`` over the call's positions to ``tally``
    (a device tensor sum: no host sync)."""
    import torch

    def hook(module, args, output):  # output: resid_post [B, T, d_model] (or a tuple whose first item it is)
        h = output[0] if isinstance(output, tuple) else output
        steered = h + vector
        if tally is not None:
            realised = torch.linalg.vector_norm((steered - h).detach(), dim=-1, dtype=torch.float32)  # [B, T]
            tally[0], tally[1] = tally[0] + realised.sum() / requested, tally[1] + realised.numel()
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


class Intervened:
    """The active form of an Intervention: the neuron patch and the steer, entered and left together."""

    def __init__(self, handle: ModelHandle, neurons: NeuronSet, spec: Intervention):
        self.spec = spec
        self.patch = Patch(handle, neurons, spec.patch)
        self.steer = None if spec.steer is None or spec.steer.is_noop else Steer(handle, neurons, spec.steer)
        self._stack: ExitStack | None = None

    @property
    def reads_whole_rows(self) -> bool:
        """The neuron patch takes a test-time statistic over each scored row (``Patch.reads_whole_rows``)."""
        return self.patch.reads_whole_rows

    def __enter__(self) -> Intervened:
        with ExitStack() as stack:
            stack.enter_context(self.patch)
            if self.steer is not None:
                stack.enter_context(self.steer)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def summary(self) -> PatchSummary:
        ratio = None if self.steer is None else {str(k): round(v, 4) for k, v in self.steer.norm_ratio.items()}
        return replace(self.patch.summary(), patch=self.spec.describe(),
                       steer=None if self.steer is None else self.spec.steer.describe(), steer_norm_ratio=ratio)


def intervene(handle: ModelHandle, neurons: NeuronSet, spec: PatchSpec | Intervention):
    """The context manager that applies ``spec`` (a neuron patch, or a patch plus a steering vector)."""
    return Patch(handle, neurons, spec) if isinstance(spec, PatchSpec) else Intervened(handle, neurons, spec)
