"""Every patch kind in a no-op form: the one list that the bf16 no-op test (tests/test_lss.py) and the device
check (scripts/gpu_check.py) both score. Each of them must give LSS exactly 0.

A kind builds its spec toward a target. What makes it a no-op (``needs``) decides where it runs:
- ``any``: the identity on any activations (multiply by 1, add 0, add 0 x a statistic, steer with alpha 0), so
  it runs on a real neuron set;
- ``dead``: the identity on neurons that never fire when p_max = p_median = 0 (set 0, set pmax, multiply, the
  grid's entries as they are, an empty set). ``dead_neurons`` builds such a neuron set on any model;
- ``relu``: the same, and a row's low percentiles are exactly 0 (relu activations). On another activation
  (``kinds(relu=False)``) these kinds run in their ``mul`` form ("<name>_as_mul": 0 x the row's percentile),
  which goes through the same statistic and hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

from lsn_exp.specs import Intervention, PatchSpec, SteerSpec

ANY, DEAD, RELU = "any", "dead", "relu"
ZERO_STATS = ("mean", "std", "iqr", "mad", "median", "max")  # coef x stat: coef 0 adds exactly 0


@dataclass(frozen=True)
class NoopKind:
    name: str
    build: Callable[[str], PatchSpec | Intervention]  # target -> spec
    needs: str  # any | dead | relu (see the module doc)


def _fixed() -> dict[str, Callable]:
    kinds = {f"add_{stat}*0": (lambda t, s=stat: PatchSpec(t, op="add", stat=s, coef=0.0)) for stat in ZERO_STATS}
    kinds.update({
        "mul1": lambda t: PatchSpec(t, op="mul", value=1.0),
        "add0": lambda t: PatchSpec(t, op="add", value=0.0),
        "add_pmax": lambda t: PatchSpec(t, op="add", source="pmax"),
        "mul_stat_mean": lambda t: PatchSpec(t, op="mul", stat="mean"),
        "add_p10": lambda t: PatchSpec(t, op="add", stat="percentile", coef=10.0),
        "set_p5_layers_1_2": lambda t: PatchSpec(t, op="set", stat="percentile", coef=5.0, layers=(1, 2)),
        "baseline_set_max*0": lambda t: PatchSpec(t, neuron_set="baseline", op="set", stat="max", coef=0.0),
        "empty_set_7": lambda t: PatchSpec(t, neuron_set="random", op="set", value=7.0),
        "empty_stat_max": lambda t: PatchSpec(t, neuron_set="random", op="add", stat="max"),
        "others_set0": lambda t: PatchSpec(t, op="mul", value=3.0, others_op="set", others_value=0.0),
        "others_en_add0_stat": lambda t: PatchSpec(t, op="set", stat="max", coef=0.0, others_op="add",
                                                   others_value=0.0, others_langs=("en",)),
        "stat_and_others_mul": lambda t: PatchSpec(t, op="set", stat="percentile", coef=10.0, others_op="mul",
                                                   others_value=4.0),
        "steer0": lambda t: Intervention(PatchSpec(t, op="mul", value=1.0), SteerSpec(t, alpha=0.0)),
        "steer0_stat": lambda t: Intervention(PatchSpec(t, op="set", stat="max", coef=0.0), SteerSpec(t, alpha=0.0)),
    })
    return kinds


def _grid() -> dict[str, Callable]:
    """The factor search's grid (conf/lss/default.yaml), each entry as it is except that a statistic's coef is 0
    (the percentile's coef is the percentile itself)."""
    from lsn_exp import factorsearch
    from lsn_exp.settings import factor_search_settings

    out = {}
    for entry in factor_search_settings({}).grid:
        if entry.get("stat") not in (None, "percentile"):
            entry = {**entry, "coef": 0.0}
        out[f"grid_{entry['name']}"] = lambda t, e=entry: factorsearch.entry_spec(e, {"neuron_set": "lape"}, t)
    return out


def _identity(op, value, source, stat, coef) -> bool:
    return source is None and ((op == "mul" and stat is None and value == 1) or (op == "add" and (
        (stat is None and value == 0) or (stat in ZERO_STATS and coef == 0))))


def needs(spec: PatchSpec | Intervention) -> str:
    """any | dead | relu: what makes ``spec`` a no-op (see the module doc)."""
    patch = spec.patch if isinstance(spec, Intervention) else spec
    steer = spec.steer if isinstance(spec, Intervention) else None
    if patch.stat == "percentile" and patch.op != "mul":
        return RELU
    same = _identity(patch.op, patch.value, patch.source, patch.stat, patch.coef) and (
        patch.others_op is None or _identity(patch.others_op, patch.others_value, None, None, 1.0))
    return ANY if same and (steer is None or steer.is_noop) else DEAD


def as_mul(spec: PatchSpec | Intervention) -> PatchSpec | Intervention:
    """A percentile kind's ``mul`` form: 0 x the row's percentile on dead neurons, whatever the activation."""
    if isinstance(spec, Intervention):
        return replace(spec, patch=replace(spec.patch, op="mul"))
    return replace(spec, op="mul")


def kinds(relu: bool = True) -> list[NoopKind]:
    """Every kind, the grid's last; with ``relu=False`` the relu kinds in their ``mul`` form."""
    out = []
    for name, build in {**_fixed(), **_grid()}.items():
        kind = needs(build("en"))
        if kind == RELU and not relu:
            name, build, kind = f"{name}_as_mul", (lambda t, b=build: as_mul(b(t))), DEAD
        out.append(NoopKind(name, build, kind))
    return out


@contextmanager
def dead_neurons(handle, masks, languages):
    """Inside the block the neurons of ``masks`` (bool [K, L, d_ff] over ``languages``) never fire: a hook on
    each layer's gate site sets them to 0. Yields the neuron set that makes every kind a no-op: lape = ``masks``,
    baseline = the same, random empty; p_max = p_median = 0."""
    import torch

    from lsn_exp.neuronset import NeuronSet

    masks = masks.bool().cpu()
    zeros = torch.zeros(masks.shape)
    neurons = NeuronSet(languages=list(languages), masks={"lape": masks, "baseline": masks.clone(),
                              "random": torch.zeros_like(masks)}, p_max=zeros, p_median=zeros,
                              activation_prob=zeros, meta={"dead_neurons": True})
    hooks = []
    for layer, site in enumerate(handle.adapter.site("mlp.gate")):
        idx = masks[:, layer].any(dim=0).nonzero().flatten()
        if idx.numel():
            idx = idx.to(handle.adapter.site("mlp.down")[layer].weight.device)
            hooks.append(site.register_forward_hook(lambda m, a, gate, i=idx: gate.index_fill(-1, i, 0.0)))
    try:
        yield neurons
    finally:
        for hook in hooks:
            hook.remove()
