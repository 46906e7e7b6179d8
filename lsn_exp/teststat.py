"""Test-time statistics for ``patch.stat``: per sample, over its real tokens x all d_ff neurons of one layer.

A statistic is taken on each row's prefill (padding excluded, rows never mixed) and kept for that row's
KV-cache decode steps, so generation does not depend on how it is chunked. Everything stays on the device.
"""

from __future__ import annotations

import torch

from lsn_exp.specs import STATS


def sample_statistic(gate: torch.Tensor, real: torch.Tensor, stat: str, coef: float) -> torch.Tensor:
    """float32 [B]: ``coef * stat`` of ``gate`` [B, T, d_ff] over each row's real positions ``real`` [B, T].

    Padding never enters a row's statistic, and rows never mix. Quantiles interpolate linearly like
    torch.quantile (median = 50th percentile); std is the unbiased one, like torch.std; mad is the
    median absolute deviation from the median. Everything stays on the device: no host sync.
    """
    batch = gate.shape[0]
    x = gate.float().reshape(batch, -1)  # [B, T*d_ff]
    keep = real.bool()[:, :, None].expand(gate.shape).reshape(batch, -1)  # [B, T*d_ff]
    n = keep.sum(dim=1).clamp(min=1)  # [B] real values per row
    if stat == "mean":
        value = torch.where(keep, x, 0.0).sum(dim=1) / n
    elif stat == "std":
        mean = torch.where(keep, x, 0.0).sum(dim=1) / n
        squares = torch.where(keep, (x - mean[:, None]) ** 2, 0.0).sum(dim=1)
        value = (squares / (n - 1).clamp(min=1)).sqrt()
    elif stat == "max":
        value = torch.where(keep, x, float("-inf")).amax(dim=1)
    elif stat == "median":
        value = _masked_quantile(x, keep, n, 0.5)
    elif stat == "percentile":
        return _masked_quantile(x, keep, n, coef / 100.0)
    elif stat == "iqr":
        value = _masked_quantile(x, keep, n, 0.75) - _masked_quantile(x, keep, n, 0.25)
    elif stat == "mad":
        median = _masked_quantile(x, keep, n, 0.5)
        value = _masked_quantile((x - median[:, None]).abs(), keep, n, 0.5)
    else:
        raise KeyError(f"unknown statistic {stat!r}: use one of {', '.join(STATS)}")
    return coef * value


def _masked_quantile(x: torch.Tensor, keep: torch.Tensor, n: torch.Tensor, q: float) -> torch.Tensor:
    """[B]: the q-quantile of each row's kept values; padding sorts last as +inf, so ranks < n are real."""
    ordered = torch.where(keep, x, float("inf")).sort(dim=1).values  # [B, N]
    position = (n - 1).to(torch.float32) * q  # [B], fractional rank
    low, high = position.floor().long(), position.ceil().long()
    low_value = ordered.gather(1, low[:, None])[:, 0]
    high_value = ordered.gather(1, high[:, None])[:, 0]
    return low_value + (high_value - low_value) * (position - low)


class PrefillStatistics:
    """One patch's per-layer statistics: ``capture_call`` (a pre-hook on the decoder) records each call's
    attention mask and cache length; calling it with (layer, gate) gives the [B] statistic of that layer."""

    def __init__(self, stat: str, coef: float):
        self.stat, self.coef = stat, coef
        self._attention_mask: torch.Tensor | None = None  # [B, T_total] of the current decoder call
        self._past_len = 0  # cached positions before the current decoder call
        self._stats: dict[int, torch.Tensor] = {}  # layer -> [B] prefill statistic

    def capture_call(self, module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the decoder: remember the 2D attention mask and how many positions are cached."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
            raise RuntimeError("patch.stat needs a 2D attention_mask [batch, positions]; got a prepared "
                               f"{type(mask).__name__} mask (static/compiled cache?): use the default dynamic cache")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._attention_mask = mask
        self._past_len = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0  # Python int

    def __call__(self, layer: int, gate: torch.Tensor) -> torch.Tensor:
        """[B]: this layer's per-sample statistic, computed on the prefill and reused on cached steps.

        A KV-cache decode step sees only the new position(s); recomputing the statistic over them would
        make it depend on how generation is chunked. Each sample keeps the statistic of its own prompt
        (its real prefill tokens) instead. Beam search, which reorders rows, is not supported.
        """
        batch, positions = gate.shape[:2]
        if self._past_len > 0:
            stat = self._stats.get(layer)
            if stat is None or stat.shape[0] != batch:
                raise RuntimeError(f"patch.stat: no prefill statistic for layer {layer} and batch {batch}; "
                                   "enter the patch before generation starts (beam search is not supported)")
            return stat
        mask = self._attention_mask
        if mask is None:  # no mask: every position is real
            real = torch.ones(batch, positions, dtype=torch.bool, device=gate.device)
        else:
            real = mask[:, -positions:].to(device=gate.device, dtype=torch.bool)  # [B, T]
        stat = sample_statistic(gate, real, self.stat, self.coef)
        self._stats[layer] = stat
        return stat
