"""The amplification patch on tiny random models (CPU, seconds): no-op, restore, weight edit vs hook,
per-sample statistics, padding invariance (right-padded scoring, left-padded generation), steering."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

from lsn_exp import identify
from lsn_exp.errors import UserError
from lsn_exp.models import ModelHandle, load
from lsn_exp.neuronset import NeuronSet
from lsn_exp.patch import Patch
from lsn_exp.specs import NEURON_SETS, STATS, PatchSpec, parse_factor, parse_layers
from lsn_exp.teststat import sample_statistic

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("llama", "qwen2", "gemma3_text")
LANGS = ["en", "id", "fr", "xx"]  # xx: no neurons in any set
TEXTS = [
    "The weather is nice today.",
    "My grandmother grew tomatoes, beans and three kinds of peppers in the small garden behind her house.",
    "Hello.",
    "Trains leave the central station every ten minutes during the morning rush hour.",
    "She read the letter twice before answering.",
    "A cup of tea.",
    "The committee will publish its final report on the new bridge after the summer holidays, if all goes well.",
    "Why not?",
]
STAT_SPECS = [PatchSpec("id", op="set", stat=stat, coef=90.0 if stat == "percentile" else 2.0) for stat in STATS]
HOOK_SPECS = [
    PatchSpec("id", op="set", source="pmax"),
    PatchSpec("id", op="set", source="pmedian"),
    PatchSpec("id", op="add", value=0.5),
    PatchSpec("id", op="mul", value=3.0, others_op="set", others_value=0.0),  # weight edit only, no hook
    PatchSpec("id", op="add", stat="max", layers=(1, 2)),
    PatchSpec("id", op="mul", stat="percentile", coef=75.0),
]


# --- fixtures: tiny models (loaded once) and synthetic artifacts -----------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy CPU each parallel region waits (~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(model_type: str):
    cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    cfg.arch.model_type = model_type
    return cfg


@functools.cache
def tiny(model_type: str) -> ModelHandle:
    return load(tiny_config(model_type))


def make_artifact(handle: ModelHandle, rate: float = 0.1, seed: int = 0) -> NeuronSet:
    """Random sets (about ``rate`` of the neurons per language), positive p_max > p_median; xx is empty."""
    n_layers, d_ff = handle.adapter.n_layers, handle.adapter.d_ff
    gen = torch.Generator().manual_seed(seed)
    shape = (len(LANGS), n_layers, d_ff)
    masks = {name: torch.rand(shape, generator=gen) < rate for name in NEURON_SETS}
    for mask in masks.values():
        mask[LANGS.index("xx")] = False
    p_max = torch.rand(shape, generator=gen) + 0.5
    return NeuronSet(languages=list(LANGS), masks=masks, p_max=p_max, p_median=p_max / 3,
                          activation_prob=torch.rand(shape, generator=gen), meta={"synthetic": True})


@functools.cache
def neurons_for(model_type: str) -> NeuronSet:
    return make_artifact(tiny(model_type))


def encode(handle: ModelHandle, texts: list[str], side: str = "right") -> dict[str, torch.Tensor]:
    tokenizer = handle.tokenizer
    previous, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = previous


@torch.inference_mode()
def logits(handle: ModelHandle, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return handle.model(**batch).logits  # [B, T, vocab]


@torch.inference_mode()
def hidden(handle: ModelHandle, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's output [B, T, d_model]: logits without the (here 262k-wide, slow) LM head."""
    return handle.adapter.decoder(**batch).last_hidden_state


@torch.inference_mode()
def greedy(handle: ModelHandle, batch: dict[str, torch.Tensor], new_tokens: int = 8) -> torch.Tensor:
    out = handle.model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=handle.tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:]  # [B, new_tokens]


def gate_capture(handle: ModelHandle, layer: int, run) -> list[torch.Tensor]:
    """hook_gate [B, T, d_ff] of ``layer`` at each forward of ``run()``, after any patch hook already
    installed (hooks run in registration order)."""
    seen: list[torch.Tensor] = []
    hook = handle.adapter.site("mlp.gate")[layer].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen


def state_bits(handle: ModelHandle) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in handle.model.state_dict().items()}


def assert_bits_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        a, b = before[name].contiguous(), after[name].contiguous()
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{name} changed"


def hook_registry(handle: ModelHandle) -> dict[str, dict[str, list]]:
    """Every module's hook dicts (forward, pre, kwargs flags, backward), as key lists."""
    snapshot = {}
    for name, module in handle.model.named_modules():
        snapshot[name] = {attr: list(value.keys()) for attr, value in vars(module).items()
                          if attr.endswith("hooks") or "hooks_" in attr
                          if isinstance(value, dict)}
    return snapshot


# --- spec and config -------------------------------------------------------------------------------

def test_identification_builds_every_neuron_set_a_patch_accepts():
    from lsn_exp.record import Recording

    gen = torch.Generator().manual_seed(0)
    shape = (2, 2, 8)
    rec = Recording(languages=["en", "fr"], counts=torch.randint(0, 10, shape, generator=gen),
                    tokens=torch.tensor([10, 10]), sentences=torch.tensor([3, 3]), p_max=torch.rand(shape, generator=gen),
                    p_median=torch.rand(shape, generator=gen), always_active=torch.rand(shape, generator=gen) > 0.5)
    assert tuple(identify.identify(rec, 0.5, 0.5, 0.5, seed=0).masks) == NEURON_SETS


def test_from_config_factor_and_overrides():
    cfg = OmegaConf.load(REPO / "conf" / "patch" / "default.yaml")
    assert cfg.neuron_set == "lape"
    spec = PatchSpec.from_config(cfg, parse_factor(5), "id")
    assert (spec.op, spec.value, spec.source) == ("mul", 5.0, None) and spec.describe() == "id:lape:mul=5"
    spec = PatchSpec.from_config(cfg, parse_factor("pmax"), "id")
    assert (spec.op, spec.value, spec.source) == ("set", None, "pmax") and spec.describe() == "id:lape:set=pmax"
    deactivate = OmegaConf.merge(cfg, {"op": "set", "value": 0})
    spec = PatchSpec.from_config(deactivate, parse_factor("pmax"), "fr")
    assert (spec.op, spec.value, spec.source) == ("set", 0.0, None) and spec.describe() == "fr:lape:set=0"
    test_time = OmegaConf.merge(cfg, {"op": "add", "stat": "max", "coef": 2, "layers": "1-2"})
    spec = PatchSpec.from_config(test_time, parse_factor("pmax"), "id")
    assert (spec.op, spec.stat, spec.coef, spec.layers) == ("add", "max", 2.0, (1, 2))
    assert spec.describe() == "id:lape:add=max*2@L1-2"
    spec = PatchSpec.from_config(OmegaConf.merge(cfg, {"stat": "percentile", "coef": 90}), parse_factor(1), "id")
    assert (spec.op, spec.describe()) == ("set", "id:lape:set=p90")
    others = OmegaConf.merge(cfg, {"neuron_set": "baseline", "layers": [3, 0], "others_op": "set",
                                   "others_value": 0})
    spec = PatchSpec.from_config(others, parse_factor("2.5"), "id")
    assert spec.describe() == "id:baseline:mul=2.5@L0,3:others:set=0"


def test_parse_layers():
    assert parse_layers(None) is None and parse_layers("all") is None
    assert parse_layers(3) == (3,) and parse_layers("2-4") == (2, 3, 4) and parse_layers("0,7") == (0, 7)
    assert parse_layers([5, 1, 5]) == (1, 5)


def one_line_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_user_errors_are_one_line():
    cfg = OmegaConf.load(REPO / "conf" / "patch" / "default.yaml")
    pmax = parse_factor("pmax")
    assert "mul, set, add" in one_line_error(lambda: PatchSpec.from_config(
        OmegaConf.merge(cfg, {"op": "pow"}), pmax, "id"))
    assert "mean, std, iqr, mad, median, max, percentile" in one_line_error(lambda: PatchSpec.from_config(
        OmegaConf.merge(cfg, {"stat": "mode"}), pmax, "id"))
    assert "lape, baseline, random" in one_line_error(lambda: PatchSpec.from_config(
        OmegaConf.merge(cfg, {"neuron_set": "lsn"}), pmax, "id"))
    assert "patch.op" in one_line_error(lambda: PatchSpec.from_config(OmegaConf.merge(cfg, {"value": 0}), pmax, "id"))
    assert "0..100" in one_line_error(lambda: PatchSpec("id", op="set", stat="percentile", coef=150))
    assert "others_value" in one_line_error(lambda: PatchSpec("id", value=2.0, others_op="set"))
    assert "range" in one_line_error(lambda: parse_layers("a-b"))
    assert "mul, set, add" in one_line_error(lambda: PatchSpec("id", value=2.0, others_op="zero", others_value=0))


def test_model_dependent_errors_are_one_line():
    handle, neurons = tiny("llama"), neurons_for("llama")
    assert "0..3" in one_line_error(lambda: Patch(handle, neurons, PatchSpec("id", value=2.0, layers=(1, 4))))
    assert "en id fr xx" in one_line_error(lambda: Patch(handle, neurons, PatchSpec("sw", value=2.0)))
    small = make_artifact(tiny("llama"))
    small.masks.pop("random")
    assert "lape, baseline" in one_line_error(lambda: Patch(handle, small, PatchSpec("id", "random", value=2.0)))


# --- no-op and restore -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_noop_patches_are_bit_identical(arch):
    handle, neurons = tiny(arch), neurons_for(arch)
    batch = encode(handle, TEXTS)
    reference, bits, hooks = logits(handle, batch), state_bits(handle), hook_registry(handle)
    noops = [PatchSpec("id", value=1.0), PatchSpec("id", op="add", value=0.0),
             PatchSpec("xx", op="set", source="pmax"), PatchSpec("xx", op="set", stat="max"),
             PatchSpec("xx", value=5.0), PatchSpec("xx", op="set", value=0.0)]
    for spec in noops:
        with Patch(handle, neurons, spec) as patch:
            assert patch.is_noop, spec.describe()
            assert hook_registry(handle) == hooks
            assert torch.equal(logits(handle, batch), reference), spec.describe()
        assert_bits_equal(bits, state_bits(handle))


@pytest.mark.parametrize("spec", [PatchSpec("id", value=5.0), PatchSpec("id", op="set", value=0.0),
                                  *HOOK_SPECS, *STAT_SPECS], ids=PatchSpec.describe)
def test_exit_restores_every_bit_and_hook(spec):
    handle, neurons = tiny("llama"), neurons_for("llama")
    batch = encode(handle, TEXTS)
    reference, bits, hooks = hidden(handle, batch), state_bits(handle), hook_registry(handle)
    with Patch(handle, neurons, spec) as patch:
        assert not patch.is_noop
        assert not torch.equal(hidden(handle, batch), reference)
        greedy(handle, encode(handle, TEXTS[:2], side="left"), new_tokens=3)
    assert hook_registry(handle) == hooks
    assert_bits_equal(bits, state_bits(handle))
    assert torch.equal(hidden(handle, batch), reference)


def test_exit_restores_after_an_error():
    handle, neurons = tiny("llama"), neurons_for("llama")
    bits, hooks = state_bits(handle), hook_registry(handle)
    with pytest.raises(ZeroDivisionError):
        with Patch(handle, neurons, PatchSpec("id", value=4.0, others_op="add", others_value=1.0)):
            1 / 0
    assert hook_registry(handle) == hooks
    assert_bits_equal(bits, state_bits(handle))


def test_others_langs_deactivates_only_the_named_languages_neurons():
    handle, neurons = tiny("llama"), neurons_for("llama")
    layer = 1
    target, en, fr = (neurons.masks["lape"][LANGS.index(c), layer] for c in ("id", "en", "fr"))
    only_en = Patch(handle, neurons, PatchSpec("id", value=2.0, others_op="set", others_value=0.0,
                                                others_langs=("en",)))
    everyone = Patch(handle, neurons, PatchSpec("id", value=2.0, others_op="set", others_value=0.0))
    assert only_en.others_per_layer[layer] == int((en & ~target).sum())
    assert everyone.others_per_layer[layer] == int(((en | fr) & ~target).sum())
    assert only_en.spec.describe() == "id:lape:mul=2:others(en):set=0"
    batch = encode(handle, TEXTS)
    with Patch(handle, neurons, only_en.spec, weight_edit=False):  # in the hook, so the gate site shows it
        gate = gate_capture(handle, layer, lambda: hidden(handle, batch))[0]
    assert (gate[..., (en & ~target).nonzero().flatten()] == 0).all()
    assert not (gate[..., (fr & ~target & ~en).nonzero().flatten()] == 0).all()
    with pytest.raises(UserError, match="unknown language code"):
        PatchSpec("id", value=2.0, others_op="set", others_value=0.0, others_langs=("zz",))


# --- weight edit == hook ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [PatchSpec("id", value=5.0), PatchSpec("id", value=-0.5, layers=(0, 2)),
                                  PatchSpec("id", op="mul", source="pmax"), PatchSpec("id", op="set", value=0.0),
                                  PatchSpec("id", value=3.0, others_op="set", others_value=0.0)],
                         ids=PatchSpec.describe)
def test_weight_edit_equals_hook(arch, spec):
    handle, neurons = tiny(arch), neurons_for(arch)
    batch = encode(handle, TEXTS)
    hooks = hook_registry(handle)
    with Patch(handle, neurons, spec) as edit:
        assert edit.summary().hook_layers == 0 and hook_registry(handle) == hooks  # weights only
        by_weights = hidden(handle, batch)
    with Patch(handle, neurons, spec, weight_edit=False) as hooked:
        assert hooked.summary().weight_edit_layers == 0
        by_hook = hidden(handle, batch)
    assert not torch.equal(by_hook, hidden(handle, batch))
    torch.testing.assert_close(by_weights, by_hook, rtol=1e-5, atol=1e-5)


# --- what the hooks write ---------------------------------------------------------------------------

def reference_statistic(values: torch.Tensor, stat: str, coef: float) -> torch.Tensor:
    """The statistic of one sample's real activations (flat), straight from torch."""
    q = functools.partial(torch.quantile, values)
    if stat == "percentile":
        return q(coef / 100)
    median = q(0.5)
    value = {"mean": values.mean(), "std": values.std(), "max": values.max(), "median": median,
             "iqr": q(0.75) - q(0.25), "mad": torch.quantile((values - median).abs(), 0.5)}[stat]
    return coef * value


@pytest.mark.parametrize("stat", STATS)
def test_sample_statistic_uses_only_each_rows_real_tokens(stat):
    gen = torch.Generator().manual_seed(1)
    gate = torch.randn(5, 9, 16, generator=gen)
    lengths = [9, 1, 4, 7, 2]
    real = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]  # right padding
    real[3] = real[3].flip(0)  # and one left-padded row
    gate[~real] = 1e6  # padding that would dominate any statistic it leaked into
    coef = 30.0 if stat == "percentile" else 1.5
    got = sample_statistic(gate, real, stat, coef)
    want = torch.stack([reference_statistic(gate[b][real[b]].flatten(), stat, coef) for b in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [*HOOK_SPECS[:3], *STAT_SPECS,
                                  PatchSpec("id", op="add", stat="median", coef=-1.0),
                                  PatchSpec("id", op="mul", stat="std", coef=2.0)], ids=PatchSpec.describe)
def test_layer0_activations_follow_the_spec(spec):
    """Layer 0 sees unpatched inputs, so its patched activations can be checked against the spec exactly."""
    handle, neurons = tiny("llama"), neurons_for("llama")
    batch = encode(handle, TEXTS)
    [before] = gate_capture(handle, 0, lambda: hidden(handle, batch))  # [B, T, d_ff]
    with Patch(handle, neurons, spec, weight_edit=False):
        [after] = gate_capture(handle, 0, lambda: hidden(handle, batch))
    idx = neurons.neurons(spec.neuron_set, spec.target)[0]
    rest = torch.ones(before.shape[-1], dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(after[..., rest], before[..., rest])
    if spec.stat is not None:
        real = batch["attention_mask"].bool()
        value = torch.stack([reference_statistic(before[b][real[b]].flatten(), spec.stat, spec.coef)
                             for b in range(len(TEXTS))])[:, None, None]  # [B, 1, 1]
    else:
        stored = neurons.p_max if spec.source == "pmax" else neurons.p_median
        value = stored[LANGS.index("id"), 0, idx] if spec.source else torch.tensor(spec.value)
    expected = {"set": value.expand_as(before[..., idx]), "add": before[..., idx] + value,
                "mul": before[..., idx] * value}[spec.op]
    torch.testing.assert_close(after[..., idx], expected, rtol=1e-5, atol=1e-5)


# --- padding invariance ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [PatchSpec("id", value=5.0), *HOOK_SPECS, *STAT_SPECS], ids=PatchSpec.describe)
def test_right_padded_batch_matches_each_sample_alone(arch, spec):
    handle, neurons = tiny(arch), neurons_for(arch)
    batch = encode(handle, TEXTS)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert len(TEXTS) == 8 and len(set(lengths)) > 4
    with Patch(handle, neurons, spec):
        together = hidden(handle, batch)
        alone = [hidden(handle, encode(handle, [text]))[0] for text in TEXTS]
    for b, (length, single) in enumerate(zip(lengths, alone)):
        torch.testing.assert_close(together[b, :length], single, rtol=1e-4, atol=1e-4, msg=f"row {b}")


@pytest.mark.parametrize("spec", [PatchSpec("id", value=5.0), PatchSpec("id", op="set", source="pmax"),
                                  PatchSpec("id", op="set", stat="max", coef=3.0),
                                  PatchSpec("id", op="add", stat="percentile", coef=95.0)], ids=PatchSpec.describe)
def test_left_padded_generation_matches_each_sample_alone(spec):
    handle, neurons = tiny("llama"), neurons_for("llama")
    prompts = TEXTS[:4]
    with Patch(handle, neurons, spec):
        together = greedy(handle, encode(handle, prompts, side="left"))
        alone = torch.cat([greedy(handle, encode(handle, [p], side="left")) for p in prompts])
    assert torch.equal(together, alone)


def test_decode_steps_reuse_each_samples_prefill_statistic():
    handle, neurons = tiny("llama"), neurons_for("llama")
    spec = PatchSpec("id", op="set", stat="mean", coef=4.0)
    batch = encode(handle, TEXTS[:3], side="left")
    idx = neurons.neurons("lape", "id")[0]
    [prompt] = gate_capture(handle, 0, lambda: hidden(handle, batch))  # unpatched prompt activations
    with Patch(handle, neurons, spec):
        prefill, *steps = gate_capture(handle, 0, lambda: greedy(handle, batch, new_tokens=4))
    real = batch["attention_mask"].bool()
    want = torch.stack([reference_statistic(prompt[b][real[b]].flatten(), "mean", 4.0) for b in range(3)])
    assert len(steps) == 3 and all(step.shape[1] == 1 for step in steps)
    for step in [prefill, *steps]:
        torch.testing.assert_close(step[..., idx], want[:, None, None].expand_as(step[..., idx]))


# --- generation is patched, KV-cache steps included -------------------------------------------------

@torch.inference_mode()
def greedy_without_cache(handle: ModelHandle, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = input_ids
    for _ in range(new_tokens):
        step = handle.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, step], dim=1)
    return ids[:, input_ids.shape[1]:]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [PatchSpec("id", value=1000.0), PatchSpec("id", op="set", source="pmax"),
                                  PatchSpec("id", op="add", value=3.0, layers=(1, 2))], ids=PatchSpec.describe)
def test_generation_is_patched(arch, spec):
    handle, neurons = tiny(arch), make_artifact(tiny(arch), rate=0.3, seed=1)
    single = encode(handle, [TEXTS[1]])
    plain = greedy(handle, single, new_tokens=10)
    with Patch(handle, neurons, spec):
        patched = greedy(handle, single, new_tokens=10)
        recomputed = greedy_without_cache(handle, single["input_ids"], new_tokens=10)
    assert not torch.equal(patched, plain)
    assert torch.equal(patched, recomputed)  # cached decode steps are patched like full forwards


# --- no host sync in the hooks ----------------------------------------------------------------------

@contextlib.contextmanager
def no_host_sync(device: str):
    """On CUDA, any synchronising call (.item(), .tolist(), nonzero, ...) raises inside this block."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("device", ["cpu", pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
@torch.inference_mode()
def test_hooks_run_without_host_sync(device):
    """The installed hooks, called directly on device tensors (prefill, then a cached step), never sync."""
    cfg = tiny_config("llama")
    cfg.device = device
    handle, neurons = (tiny("llama") if device == "cpu" else load(cfg)), neurons_for("llama")
    decoder, d_ff = handle.adapter.decoder, handle.adapter.d_ff
    gate = torch.randn(3, 5, d_ff, device=device)  # [B, T, d_ff]
    mask = torch.ones(3, 5, dtype=torch.long, device=device)
    mask[0, 3:] = 0
    cache = DynamicCache()  # a real cache holding the 5 prefill positions, as in generate's decode steps
    cache.update(torch.zeros(3, 2, 5, 16, device=device), torch.zeros(3, 2, 5, 16, device=device), layer_idx=0)
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long, device=device)], dim=1)  # [B, 6]
    hooked = 0
    for spec in [*HOOK_SPECS, *STAT_SPECS]:
        with Patch(handle, neurons, spec):
            pre_hooks = list(decoder._forward_pre_hooks.values())  # the statistic's mask capture
            hooks = [(m, h) for m in handle.adapter.site("mlp.gate") for h in m._forward_hooks.values()]
            assert len(pre_hooks) == (spec.stat is not None)
            hooked += bool(hooks)
            with no_host_sync(device):
                for pre_hook in pre_hooks:
                    pre_hook(decoder, (), {"attention_mask": mask, "cache": None})
                prefill = [hook(module, (gate,), gate.clone()) for module, hook in hooks]
                for pre_hook in pre_hooks:
                    pre_hook(decoder, (), {"attention_mask": step_mask, "cache": cache})
                step = [hook(module, (gate[:, :1],), gate[:, :1].clone()) for module, hook in hooks]
            assert all(out.shape == gate.shape and out.device == gate.device for out in prefill)
            assert all(out.shape == (3, 1, d_ff) for out in step)
    assert hooked == len(HOOK_SPECS) + len(STAT_SPECS) - 1  # all but the weight-only mul/set-0 spec
