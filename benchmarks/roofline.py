"""The matmul roofline of a decoder body on this machine, measured on the model's own layer shapes.

``body_flops_per_token``: 2 FLOPs per weight of every linear layer of the decoder body (attention and MLP
projections, no LM head) plus the attention scores and the weighted sum (4 * heads * head_dim * context
per layer). ``matmul_gflops``: the rate ``x @ W.T`` reaches on those shapes (rows = tokens in a batch),
timed right before the workload it is compared with, so both see the same machine state.
``roofline tokens/s = GFLOP/s / body FLOPs per token``; a workload's tokens/s divided by it is the ratio the
benchmarks report.
"""

from __future__ import annotations

import statistics
import time

import torch


def body_linears(model) -> list[torch.nn.Linear]:
    """Every nn.Linear of the decoder layers (the LM head and embeddings left out)."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    return [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def body_flops_per_token(model, context: float) -> float:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 4 * cfg.num_attention_heads * head_dim * context * cfg.num_hidden_layers
    return 2 * sum(m.weight.numel() for m in body_linears(model)) + attention


def matmul_gflops(model, rows: int, repeats: int = 3) -> float:
    """GFLOP/s of ``x @ W.T`` over one layer's distinct weight shapes, ``rows`` tokens at a time (median of
    ``repeats`` rounds, each weighted by how often the shape occurs in the body)."""
    shapes: dict[tuple[int, int], int] = {}
    for m in body_linears(model):
        shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + 1
    dtype = next(model.parameters()).dtype
    weights = {s: torch.randn(s, dtype=dtype) for s in shapes}
    inputs = {s: torch.randn(rows, s[1], dtype=dtype) for s in shapes}
    flops = sum(2 * rows * s[0] * s[1] * n for s, n in shapes.items())
    rounds = []
    with torch.inference_mode():
        for s in shapes:  # warm-up
            inputs[s] @ weights[s].T
        for _ in range(repeats):
            seconds = 0.0
            for s, n in shapes.items():
                start = time.perf_counter()
                for _ in range(n):
                    inputs[s] @ weights[s].T
                seconds += time.perf_counter() - start
            rounds.append(flops / seconds / 1e9)
    return statistics.median(rounds)
