"""lsn_exp.noops: the one list of no-op patch kinds (tests/test_lss.py and scripts/gpu_check.py score it) and the
dead-neuron construction that makes the non-identity kinds no-ops."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, data, noops
from lsn_exp.settings import factor_search_settings
from lsn_exp.specs import Intervention, PatchSpec, SteerSpec


def test_every_grid_entry_and_every_op_has_a_noop_kind_that_says_what_makes_it_one():
    kinds = noops.kinds()
    names = {kind.name for kind in kinds}
    grid = factor_search_settings(OmegaConf.load(CONF_DIR / "lss" / "default.yaml")).grid
    assert {f"grid_{e['name']}" for e in grid} <= names
    specs = [kind.build("id") for kind in kinds]
    patches = [s.patch if isinstance(s, Intervention) else s for s in specs]
    assert {p.op for p in patches} == {"mul", "set", "add"} and {p.stat for p in patches} >= set(noops.ZERO_STATS)
    assert {kind.needs for kind in kinds} == {noops.ANY, noops.DEAD, noops.RELU}
    assert noops.needs(PatchSpec("id", op="add", stat="max", coef=0.0)) == noops.ANY
    assert noops.needs(PatchSpec("id", op="set", stat="max", coef=0.0)) == noops.DEAD
    assert noops.needs(Intervention(PatchSpec("id", value=1.0), SteerSpec("id", alpha=0.1))) == noops.DEAD
    assert noops.needs(PatchSpec("id", op="set", stat="percentile", coef=10.0)) == noops.RELU
    plain = noops.kinds(relu=False)
    assert len(plain) == len(kinds) and noops.RELU not in {kind.needs for kind in plain}
    assert {k.name for k in plain if k.name.endswith("_as_mul")} == {k.name + "_as_mul" for k in kinds
                                                                      if k.needs == noops.RELU}


def test_dead_neurons_never_fire_inside_the_block_and_the_model_is_restored_after(tiny):
    shape = (len(data.LSS_LANGS), tiny.adapter.n_layers, tiny.adapter.d_ff)
    masks = torch.zeros(shape, dtype=torch.bool)
    masks[0, 1, :7] = True
    gates = {}
    hook = tiny.adapter.site("mlp.down")[1].register_forward_pre_hook(  # its input: gate x up, per neuron
        lambda m, args: gates.__setitem__("g", args[0]))
    ids = torch.tensor([[2, 100, 200, 300]])
    try:
        with torch.inference_mode():
            tiny.model(ids)
            before = gates["g"].clone()
            with noops.dead_neurons(tiny, masks, data.LSS_LANGS) as neurons:
                tiny.model(ids)
                inside = gates["g"].clone()
            tiny.model(ids)
    finally:
        hook.remove()
    assert before[..., :7].abs().sum() > 0 and inside[..., :7].abs().sum() == 0
    assert torch.equal(inside[..., 7:], before[..., 7:]) and torch.equal(gates["g"], before)
    assert neurons.masks["random"].sum() == 0 and neurons.p_max.abs().sum() == 0
