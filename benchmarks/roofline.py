"""The matmul roofline of a decoder on this machine, measured on the model's own layer shapes.

``body_flops_per_token``: 2 FLOPs per weight of every linear layer of the decoder body (attention and MLP
projections, no LM head) plus the attention scores and the weighted sum (4 * heads * head_dim * context
per layer). ``head_flops_per_position``: 2 FLOPs per LM-head weight, for every position whose logits are read.
``matmul_gflops``: the rate ``x @ W.T`` reaches on those shapes (rows = tokens in a batch), on the model's device and
in its dtype, timed right before the workload it is compared with, so both see the same machine state.
``roofline seconds = body FLOPs / body GFLOP/s + head FLOPs / head GFLOP/s``; a workload's roofline time
divided by its measured time is the ratio the benchmarks report.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The benchmarks' shared options: --model (conf/model/<name>.yaml) and --lang (FLORES text)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_270m", help="conf/model/<name>.yaml")
    parser.add_argument("--lang", default="en", help="the FLORES dev language recorded")
    return parser


def body_linears(model) -> list[torch.nn.Linear]:
    """Every nn.Linear of the decoder layers (the LM head and embeddings left out)."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    return [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def body_flops_per_token(model, context: float) -> float:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 4 * cfg.num_attention_heads * head_dim * context * cfg.num_hidden_layers
    return 2 * sum(m.weight.numel() for m in body_linears(model)) + attention


def head_flops_per_position(model) -> float:
    return 2 * model.get_output_embeddings().weight.numel()


def shapes(model, head: bool = False) -> dict[tuple[int, int], int]:
    """Distinct weight shapes -> how often they occur: the body's linears, or the LM head alone."""
    found: dict[tuple[int, int], int] = {}
    for m in [model.get_output_embeddings()] if head else body_linears(model):
        found[tuple(m.weight.shape)] = found.get(tuple(m.weight.shape), 0) + 1
    return found


def matmul_gflops(model, rows: int, repeats: int = 3, head: bool = False) -> float:
    """GFLOP/s of ``x @ W.T`` over the body's distinct weight shapes (or the LM head's), ``rows`` tokens at a
    time (median of ``repeats`` rounds, each shape weighted by how often it occurs)."""
    counts = shapes(model, head)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    weights = {s: torch.randn(s, dtype=dtype, device=device) for s in counts}
    inputs = {s: torch.randn(max(rows, 1), s[1], dtype=dtype, device=device) for s in counts}
    flops = sum(2 * max(rows, 1) * s[0] * s[1] * n for s, n in counts.items())
    rounds = []
    with torch.inference_mode():
        for s in counts:  # warm-up
            inputs[s] @ weights[s].T
        for _ in range(repeats):
            seconds = 0.0
            for s, n in counts.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(n):
                    inputs[s] @ weights[s].T
                synchronize(device)
                seconds += time.perf_counter() - start
            rounds.append(flops / seconds / 1e9)
    return statistics.median(rounds)


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer sees it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class ScoringWork:
    """The useful work of scoring (context, continuation) pairs the way LsnHFLM's shared-prompt path does:
    each distinct context fed once and read at its last position, each continuation's tokens 2.. fed after
    it and read (padding left out)."""

    fed_tokens: int
    scored_positions: int
    mean_context: float  # mean causal context of a fed token
    contexts: int

    @classmethod
    def of(cls, lm, requests: list[tuple[str, str]]) -> ScoringWork:
        pairs = {tuple(map(tuple, lm._encode_pair(ctx, cont))) for ctx, cont in set(requests)}
        contexts = {ctx for ctx, _ in pairs}
        later = [(len(ctx), len(cont) - 1) for ctx, cont in pairs]
        fed = sum(len(c) for c in contexts) + sum(n for _, n in later)
        context_sum = sum(len(c) ** 2 / 2 for c in contexts) + sum(n * (c + n / 2) for c, n in later)
        return cls(fed, len(contexts) + sum(n for _, n in later), context_sum / max(fed, 1), len(contexts))

    def __add__(self, other: ScoringWork) -> ScoringWork:
        """Two separate scoring runs (e.g. the unpatched columns, then the patched run)."""
        fed = self.fed_tokens + other.fed_tokens
        context = (self.mean_context * self.fed_tokens + other.mean_context * other.fed_tokens) / max(fed, 1)
        return ScoringWork(fed, self.scored_positions + other.scored_positions, context, self.contexts + other.contexts)

    def roofline_seconds(self, model, repeats: int = 3, batch_rows: int = 512) -> tuple[float, dict]:
        """Seconds at the measured matmul rates, and the figures behind them."""
        body_gflops = matmul_gflops(model, batch_rows, repeats)
        head_gflops = matmul_gflops(model, min(batch_rows, 128), repeats, head=True)
        body = self.fed_tokens * body_flops_per_token(model, self.mean_context)
        head = self.scored_positions * head_flops_per_position(model)
        seconds = body / body_gflops / 1e9 + head / head_gflops / 1e9
        return seconds, {"body_gflop": body / 1e9, "head_gflop": head / 1e9, "body_gflops": body_gflops,
                         "head_gflops": head_gflops}
