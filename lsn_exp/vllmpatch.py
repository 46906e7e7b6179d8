"""Neuron patches inside vLLM (issue 25, first step: an in-process engine in eager mode).

vLLM fuses a decoder layer's activation and the up projection's product (``SiluAndMul``, ``GeluAndMul``: ``x ->
act(x[:d]) * x[d:]``). To patch the neurons of ``act(gate)`` exactly as ``lsn_exp.patch`` does through transformers,
each patched layer's fused op is wrapped: ``act(gate)``, then the same actions (``patch.plan_layer``, in the hook
form: set / add / multiply on the chosen neurons), then the product. Each layer gets its own wrapper (Gemma's vLLM
model shares one activation object across layers), and every layer gets its own op back on exit.

Refused in one line: test-time statistics (not built yet), an engine with compilation or CUDA graphs (a module
swapped after the model is built is silently ignored there), and prefix caching (it would serve KV computed before
the patch).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lsn_exp.errors import UserError
from lsn_exp.patch import apply_action, check_artifact, plan_layer
from lsn_exp.specs import PatchSpec, check_layers

ACTIVATIONS = {"SiluAndMul": lambda fused, x: F.silu(x),
               "GeluAndMul": lambda fused, x: F.gelu(x, approximate=fused.approximate)}


class PatchedActAndMul(nn.Module):
    """A layer's fused ``act(gate) * up`` with the patch's actions applied to ``act(gate)`` in between."""

    def __init__(self, fused: nn.Module, actions: list):
        super().__init__()
        kind = type(fused).__name__
        if kind not in ACTIVATIONS:
            raise UserError(f"vLLM's {kind} is not a fused activation lsn_exp can patch: {', '.join(ACTIVATIONS)}")
        self.fused, self.actions, self.act = fused, actions, ACTIVATIONS[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        gate = self.act(self.fused, x[..., :d])
        for action in self.actions:
            apply_action(gate, action, None)
        return gate * x[..., d:]


def check_engine(llm) -> None:
    """The engine runs eagerly, without prefix caching: what a module swap reaches and a patch cannot get wrong."""
    config = llm.llm_engine.vllm_config
    if not config.model_config.enforce_eager:
        raise UserError("a vLLM patch needs enforce_eager=True: with compilation a swapped module is silently ignored")
    if config.cache_config.enable_prefix_caching:
        raise UserError("a vLLM patch needs enable_prefix_caching=False: the cache would serve pre-patch KV")


@contextmanager
def patched(llm, handle, neurons, spec: PatchSpec):
    """Inside the block ``llm`` (vllm.LLM, in-process) runs ``spec``; ``handle`` is the same model through
    transformers, on the same device and dtype (the plan's indices and values are computed on it)."""
    if spec.stat is not None:
        raise UserError("patch.stat (test-time statistics) does not run inside vLLM yet: use engine=hf")
    check_engine(llm)
    check_artifact(handle, neurons, spec)
    plans = [plan_layer(handle, neurons, spec, layer, weight_edit=False)
             for layer in check_layers(spec.layers, handle.adapter.n_layers)]
    actions = {plan.layer: plan.actions for plan in plans if plan.actions}

    def install(model) -> None:
        for layer, found in actions.items():
            mlp = model.model.layers[layer].mlp
            mlp.act_fn = PatchedActAndMul(mlp.act_fn, found)

    def remove(model) -> None:
        for layer in actions:
            mlp = model.model.layers[layer].mlp
            if isinstance(mlp.act_fn, PatchedActAndMul):
                mlp.act_fn = mlp.act_fn.fused

    llm.apply_model(install)
    try:
        yield
    finally:
        llm.apply_model(remove)
