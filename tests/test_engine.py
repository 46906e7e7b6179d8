"""The engine seam: every stage runs the model through ``engine_of(handle)``, so an engine attached to the handle
(as a serving engine's loader would) carries identification, LSS, downstream scoring and generation unchanged."""

from __future__ import annotations

import ast
import dataclasses
from collections import Counter

import torch
from conftest import load_tiny

from lsn_exp import REPO_ROOT, downstream, generate, identify, lss
from lsn_exp.cache import CacheStore
from lsn_exp.engine import HFEngine, engine_of
from lsn_exp.settings import eval_settings, generate_settings, identify_settings, lss_settings
from lsn_exp.specs import PatchSpec

IDENTIFY = {"languages": ["en", "fr", "ja"], "split": "dev", "max_tokens": 300, "n_stat_sentences": 8,
            "prefix": "auto", "top_rate": 0.05, "filter_rate": 0.95, "bar_rate": 0.95, "batch_size": 8}


ASKED = ("lm", "generate", "continuation_nll", "record", "intervene")  # every method of the Engine protocol


def counted(name: str):
    def method(self, *args, **kwargs):
        self.calls[name] += 1
        return getattr(HFEngine, name)(self, *args, **kwargs)
    return method


class CountingEngine(HFEngine):
    """A second engine: the transformers one, counting what each stage asks of it."""

    def __init__(self, handle):
        super().__init__(handle)
        self.calls = Counter()

    lm, generate, continuation_nll, record, intervene = (counted(name) for name in ASKED)


def run_stages(handle, data_root, tmp_path) -> dict:
    """Identification, LSS toward fr, XCOPA under the same patch and generation, on ``handle``."""
    neurons = identify.build(identify_settings(IDENTIFY), handle, data_root, CacheStore(tmp_path), seed=0).neurons
    spec = PatchSpec("fr", op="set", source="pmax")
    scored = lss.LssEvaluator(handle, lss_settings({"n_facts": 3, "sources": ["en", "ja"], "bootstrap": 0}), data_root,
                              None).score(neurons, spec)
    xcopa = eval_settings({"tasks": ["xcopa"], "langs": ["id"], "limit": 4})
    tasks, _ = downstream.DownstreamEvaluator(handle, xcopa, data_root,
                                              None).score(neurons, spec)
    settings = generate_settings({"sources": ["en"], "n_prompts": 2, "max_new_tokens": 4})
    summary, rows = generate.steering(handle, generate.prompt_sets(settings, data_root), "fr", settings,
                                      engine_of(handle).intervene(neurons, spec))
    return {"p_max": neurons.p_max, "lss": dataclasses.asdict(scored)["cells"],
            "xcopa": dataclasses.asdict(tasks)["tasks"], "rows": rows}


def test_an_engine_attached_to_the_handle_runs_every_stage(data_root, tmp_path):
    plain = run_stages(load_tiny("llama"), data_root, tmp_path / "plain")
    handle = load_tiny("llama")
    handle.engine = CountingEngine(handle)
    routed = run_stages(handle, data_root, tmp_path / "routed")
    assert set(handle.engine.calls) == set(ASKED)
    assert handle.engine.calls["record"] == 3  # one pass per language
    assert torch.equal(plain.pop("p_max"), routed.pop("p_max"))
    assert plain == routed


STAGES = ("identify", "lss", "downstream", "generate", "compare", "factorsearch", "api", "job")
RUNTIME = {"record": {"language_stats", "record_language"}, "steer": {"intervene"}, "lmeval": {"hflm"},
           "decoding": {"greedy_generate"}, "patch": {"Patch"}}


def test_no_stage_reaches_past_the_engine():
    """Stage modules never call the model (``.model(``) nor import the runtime the engine wraps."""
    bad = []
    for name in STAGES:
        tree = ast.parse((REPO_ROOT / "lsn_exp" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lsn_exp."):
                reached = {a.name for a in node.names} & RUNTIME.get(node.module.split(".")[1], set())
                bad += [f"{name} imports {node.module}.{r}" for r in sorted(reached)]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.attr in RUNTIME.get(node.value.id, set()):
                bad.append(f"{name} calls {node.value.id}.{node.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "model":
                bad.append(f"{name} calls .model(...) at line {node.lineno}")
    assert not bad, "\n".join(bad)


# --- engine=vllm without vLLM: what runs in the main environment ------------------------------------------

def test_the_vllm_buffers_do_a_layers_actions_as_the_transformers_hook_does():
    """vllmpatch folds a layer's actions (in order) into scale / shift / set / value rows; the plugin's fused-op
    wrapper then gives what patch.apply_action gives on act(gate), times up. Identity rows are exact."""
    from lsn_exp.patch import _Action, apply_action
    from lsn_exp.vllmpatch import fold_actions
    from lsn_exp.vllmplugin import SteerableActAndMul

    class SiluAndMul(torch.nn.Module):  # vLLM's op, as its forward_native computes it
        def forward(self, x):
            d = x.shape[-1] // 2
            return torch.nn.functional.silu(x[..., :d]) * x[..., d:]

    width, generator = 64, torch.Generator().manual_seed(0)
    x = torch.randn(5, 2 * width, generator=generator)
    idx = [torch.randperm(width, generator=generator)[:12] for _ in range(3)]
    actions = [_Action(idx[0], "set", torch.randn(12, generator=generator)),
               _Action(idx[1], "mul", torch.full((12,), 3.0)),
               _Action(idx[2], "add", torch.randn(12, generator=generator))]
    wrapped = SteerableActAndMul(SiluAndMul(), width, torch.float32, torch.device("cpu"))
    assert torch.equal(wrapped(x), SiluAndMul()(x))  # identity buffers: bit for bit
    for name, row in fold_actions(actions, width, torch.float32).items():
        getattr(wrapped, name).copy_(row)
    gate = torch.nn.functional.silu(x[:, :width])[None]
    for action in actions:
        apply_action(gate, action, None)
    torch.testing.assert_close(wrapped(x), gate[0] * x[:, width:], rtol=1e-6, atol=1e-6)


def test_engine_vllm_without_the_optional_install_stops_in_one_line(tmp_path):
    import importlib.util

    import pytest

    from lsn_exp import job
    from lsn_exp.errors import UserError
    from lsn_exp.settings import engine_settings

    assert engine_settings({"name": "vllm", "enforce_eager": False}).enforce_eager is False
    with pytest.raises(UserError, match="engine.name"):
        engine_settings({"name": "sglang"})
    with pytest.raises(UserError, match="not an engine setting"):
        engine_settings({"name": "vllm", "eager": True})
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment: make test-vllm runs the engine itself")
    with pytest.raises(UserError, match="make install-vllm"):
        job.start_vllm(None, None)
