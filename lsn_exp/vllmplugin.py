"""Intervention buffers built into vLLM's models: lsn_exp's ``vllm.general_plugins`` entry point (pyproject.toml).

vLLM loads the plugin in every process it starts. When ``LSN_VLLM_STEERABLE=1`` is set (``lsn_exp.vllmengine``
sets it before the engine starts; vLLM's worker processes inherit it), each decoder layer of a model vLLM loads
gets, after its weights and before its first forward (where compilation and CUDA-graph capture happen):
- ``mlp.act_fn = SteerableActAndMul(act_fn)``. vLLM fuses ``act(gate) * up``; the wrapper keeps the fused kernel
  and makes it ``(act(gate) * scale + shift) * up``, with ``value * up`` on the neurons where ``set`` is true.
  Each layer gets its own wrapper (Gemma's vLLM model shares one activation object across layers).
- ``lsn_vector``: added to the hidden state the layer returns. vLLM's layers return ``(hidden, residual)`` and
  the next fused add-and-norm sums them, so this moves the true residual stream after the layer.
Every buffer starts as the identity (scale 1, shift 0, set nowhere, vector 0), so the model computes exactly what
vLLM's own does until ``write`` changes them, in place, between engine calls (``LLM.apply_model`` reaches every
worker). Compiled graphs and CUDA graphs read buffers at fixed addresses, so the change reaches them; a module
swapped or a hook added after the model compiled is silently ignored instead.

Tensor parallelism shards gate and up on the neuron axis: ``write`` takes whole-model [d_ff] rows and each rank
keeps its own slice (written for, not tested: the CPU build runs one rank).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

ENABLE = "LSN_VLLM_STEERABLE"  # environment variable: "1" makes the models vLLM loads steerable
FUSED = ("SiluAndMul", "GeluAndMul")  # vLLM's fused act-and-multiply ops the wrapper supports


class SteerableActAndMul(nn.Module):
    """One layer's fused ``act(gate) * up`` with per-neuron set / scale / shift buffers on ``act(gate)``."""

    def __init__(self, fused: nn.Module, width: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.fused = fused
        self.register_buffer("scale", torch.ones(width, dtype=dtype, device=device))
        self.register_buffer("shift", torch.zeros(width, dtype=dtype, device=device))
        self.register_buffer("set", torch.zeros(width, dtype=torch.bool, device=device))
        self.register_buffer("value", torch.zeros(width, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, 2 * width] = gate | up
        up = x[..., x.shape[-1] // 2:]
        out = self.fused(x) * self.scale + self.shift * up  # identity buffers: exactly fused(x)
        return torch.where(self.set, self.value * up, out)


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{index in the whole model: decoder layer} for the layers this process holds (pipeline parallelism leaves
    placeholders without an MLP on other ranks)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return {i: layer for i, layer in enumerate(layers) if hasattr(getattr(layer, "mlp", None), "act_fn")}


def make_steerable(model: nn.Module, dtype: torch.dtype) -> int:
    """Give every decoder layer its buffers (identity, in the model's ``dtype``); the number of layers made
    steerable (0: an activation the wrapper does not know, and the model is left as vLLM built it)."""
    layers = decoder_layers(model).values()
    if any(type(layer.mlp.act_fn).__name__ not in FUSED for layer in layers):
        return 0
    for layer in layers:
        mlp = layer.mlp
        device = next(mlp.parameters()).device  # CPU builds prepack weights: their shapes say nothing
        mlp.act_fn = SteerableActAndMul(mlp.act_fn, mlp.down_proj.input_size_per_partition, dtype, device)
        layer.register_buffer("lsn_vector", torch.zeros(layer.hidden_size, dtype=dtype, device=device))
        _add_vector_to_output(type(layer))
    return len(layers)


def _add_vector_to_output(layer_class: type) -> None:
    """Once per class: its forward adds the instance's ``lsn_vector`` (if it has one) to the hidden it returns."""
    if getattr(layer_class.forward, "lsn_steerable", False):
        return
    original = layer_class.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        hidden, *rest = original(self, *args, **kwargs)
        vector = getattr(self, "lsn_vector", None)
        return (hidden if vector is None else hidden + vector, *rest)

    forward.lsn_steerable = True
    layer_class.forward = forward


def write(model: nn.Module, rows: dict[int, dict[str, torch.Tensor]]) -> int:
    """Set every steerable layer's buffers in place: ``rows[layer]`` holds whole-model tensors (scale, shift, set,
    value: [d_ff]; vector: [d_model]); a layer absent from ``rows`` returns to the identity. Runs in each worker
    (``LLM.apply_model``); returns the number of layers written (0: the model is not steerable)."""
    layers = decoder_layers(model)
    if not layers or not all(isinstance(layer.mlp.act_fn, SteerableActAndMul) for layer in layers.values()):
        return 0
    for index, layer in layers.items():
        site, found = layer.mlp.act_fn, rows.get(index, {})
        start = _shard_start(site.scale.numel())
        for name, identity in (("scale", 1), ("shift", 0), ("set", False), ("value", 0)):
            buffer = getattr(site, name)
            new = found.get(name)
            if new is None:
                buffer.fill_(identity)
            else:
                buffer.copy_(new[start: start + buffer.numel()])
        vector = found.get("vector")
        if vector is None:
            layer.lsn_vector.zero_()
        else:
            layer.lsn_vector.copy_(vector)
    return len(layers)


def _shard_start(width: int) -> int:
    """Where this rank's slice of the neuron axis starts (gate/up are column-parallel: rank r holds a block)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() * width
    except (ImportError, AssertionError, RuntimeError):
        return 0


def register() -> None:
    """The entry point: vLLM's loader makes each model it loads steerable when ``LSN_VLLM_STEERABLE=1``."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, "lsn_steerable", False):
        return

    @functools.wraps(original)
    def load_model(self, vllm_config, model_config, prefix: str = ""):
        model = original(self, vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        if os.environ.get(ENABLE) == "1":
            make_steerable(model, model_config.dtype)
        return model

    load_model.lsn_steerable = True
    BaseModelLoader.load_model = load_model
