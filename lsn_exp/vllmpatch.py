"""Neuron patches and DiffMean vectors inside vLLM (issue 25, first step: an in-process engine in eager mode).

vLLM fuses a decoder layer's activation and the up projection's product (``SiluAndMul``, ``GeluAndMul``: ``x ->
act(x[:d]) * x[d:]``). To patch the neurons of ``act(gate)`` exactly as ``lsn_exp.patch`` does through transformers,
each patched layer's fused op is wrapped: ``act(gate)``, then the same actions (``patch.plan_layer``, in the hook
form: set / add / multiply on the chosen neurons), then the product. Each layer gets its own wrapper (Gemma's vLLM
model shares one activation object across layers), and every layer gets its own op back on exit.

A DiffMean vector (``lsn_exp.steer.steering_vectors``) goes on the true residual stream: vLLM's decoder layers
return ``(hidden, residual)`` and the next fused add-and-norm sums them, so the vector is added to ``hidden`` by a
forward hook on the layer.

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
from lsn_exp.specs import Intervention, PatchSpec, check_layers
from lsn_exp.steer import steering_vectors

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


def _with_vector(vector: torch.Tensor):
    def hook(module, args, output):  # output: (hidden, residual); the stream after the layer is their sum
        return (output[0] + vector, *output[1:])

    return hook


@contextmanager
def patched(llm, handle, neurons, spec: PatchSpec | Intervention):
    """Inside the block ``llm`` (vllm.LLM, in-process) runs ``spec`` (a neuron patch, with a DiffMean vector when it
    is an Intervention); ``handle`` is the same model through transformers, on the same device and dtype (the
    plan's indices and values are computed on it)."""
    patch = spec.patch if isinstance(spec, Intervention) else spec
    steer = spec.steer if isinstance(spec, Intervention) and spec.steer is not None else None
    if patch.stat is not None:
        raise UserError("patch.stat (test-time statistics) does not run inside vLLM yet: use engine=hf")
    check_engine(llm)
    check_artifact(handle, neurons, patch)
    plans = [plan_layer(handle, neurons, patch, layer, weight_edit=False)
             for layer in check_layers(patch.layers, handle.adapter.n_layers)]
    actions = {plan.layer: plan.actions for plan in plans if plan.actions}
    found = {} if steer is None or steer.is_noop else steering_vectors(neurons, steer, handle.adapter.n_layers)
    vectors = {layer: vector.to(handle.model.dtype) for layer, vector in found.items()}
    hooks: list = []

    def install(model) -> None:
        for layer, found in actions.items():
            mlp = model.model.layers[layer].mlp
            mlp.act_fn = PatchedActAndMul(mlp.act_fn, found)
        for layer, vector in vectors.items():
            hooks.append(model.model.layers[layer].register_forward_hook(_with_vector(vector)))

    def remove(model) -> None:
        for hook in hooks:
            hook.remove()
        hooks.clear()
        for layer in actions:
            mlp = model.model.layers[layer].mlp
            if isinstance(mlp.act_fn, PatchedActAndMul):
                mlp.act_fn = mlp.act_fn.fused

    llm.apply_model(install)
    try:
        yield
    finally:
        llm.apply_model(remove)
