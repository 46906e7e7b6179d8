"""Stage 1a: record MLP gate activations (``act_fn`` output) on per-language text.

One prefill-only pass per batch through the decoder without its LM head. Hooks accumulate, on the
device and with no host sync:
  counts[l, j]      number of real tokens with act_fn(gate_proj(x))[j] > 0 (int64)
  means[s, l, j]    the mean activation over sentence s's real tokens (first n_stat sentences only)
Real tokens exclude padding and the BOS token the tokenizer settings add.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lsn_exp.models import ModelHandle


@dataclass
class Recording:
    """Per-language statistics of every neuron; K languages, L layers, d_ff neurons per layer."""

    languages: list[str]
    counts: torch.Tensor  # int64 [K, L, d]
    tokens: torch.Tensor  # int64 [K]: counted tokens per language
    sentences: torch.Tensor  # int64 [K]: counted sentences per language
    p_max: torch.Tensor  # float32 [K, L, d]
    p_median: torch.Tensor  # float32 [K, L, d]: lower median (torch.median)
    always_active: torch.Tensor  # bool [K, L, d]: sentence mean > 0 in every stat sentence


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]: 1 for every token fed to the model
    count_mask: torch.Tensor  # [B, T]: 1 for real tokens only (no padding, no BOS)
    stat_rows: torch.Tensor  # [B]: sentence index among the stat sentences, -1 for the others


def tokenize(tokenizer, sentences: list[str], add_bos: bool) -> list[list[int]]:
    ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None:
        ids = [[bos, *row] for row in ids]
    return ids


def select_under_cap(lengths: list[int], max_tokens: int) -> int:
    """How many leading sentences fit in ``max_tokens``; the first that would pass it ends the corpus."""
    total = 0
    for n, length in enumerate(lengths):
        if total + length > max_tokens:
            return n
        total += length
    return len(lengths)


def make_batches(ids: list[list[int]], n_prefix: int, n_stat: int, batch_size: int,
                 pad_id: int) -> list[Batch]:
    """Stat sentences first (in their own batches), then the rest; each group sorted by length to cut padding."""
    n_stat = min(n_stat, len(ids))
    stat = sorted(range(n_stat), key=lambda i: -len(ids[i]))
    rest = sorted(range(n_stat, len(ids)), key=lambda i: -len(ids[i]))
    batches = []
    for group in (stat, rest):
        for start in range(0, len(group), batch_size):
            rows = group[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for b, i in enumerate(rows):
                input_ids[b, :len(ids[i])] = torch.tensor(ids[i])
                attention[b, :len(ids[i])] = 1
            count_mask = attention.clone()
            count_mask[:, :n_prefix] = 0
            stat_rows = torch.tensor([i if i < n_stat else -1 for i in rows])
            batches.append(Batch(input_ids, attention, count_mask, stat_rows))
    return batches


class ActivationRecorder:
    """Forward hooks on every layer's act_fn; accumulate counts and stat-sentence means."""

    def __init__(self, handle: ModelHandle, n_stat: int):
        adapter = handle.adapter
        self.handle = handle
        self.counts = torch.zeros(adapter.n_layers, adapter.d_ff, dtype=torch.int64, device=handle.device)
        self.means = torch.zeros(n_stat, adapter.n_layers, adapter.d_ff, dtype=torch.float32,
                                 device=handle.device)
        self.batch: Batch | None = None
        self.stat_pos: torch.Tensor | None = None  # batch rows that are stat sentences
        self.stat_ids: torch.Tensor | None = None  # their index among the stat sentences

    def _hook(self, layer: int):
        def hook(module, inputs, output):  # output: [B, T, d_ff]
            mask = self.batch.count_mask.bool()
            self.counts[layer] += ((output > 0) & mask[..., None]).sum(dim=(0, 1))
            if self.stat_pos is not None:  # decided on the host when the batch was built: no device sync
                weights = mask.index_select(0, self.stat_pos).to(output.dtype)
                sums = torch.einsum("bt,btd->bd", weights, output.index_select(0, self.stat_pos))
                self.means[self.stat_ids, layer] = (sums / weights.sum(dim=1, keepdim=True).clamp(min=1)).float()
        return hook

    @contextmanager
    def hooked(self):
        handles = [act.register_forward_hook(self._hook(layer))
                   for layer, act in enumerate(self.handle.adapter.act_fns)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def run(self, batches: list[Batch], desc: str) -> None:
        device = self.handle.device
        decoder = self.handle.adapter.decoder
        with self.hooked():
            for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
                positions = batch.stat_rows.ge(0).nonzero().flatten()  # on the host
                self.stat_pos = positions.to(device) if len(positions) else None
                self.stat_ids = batch.stat_rows[positions].to(device)
                self.batch = Batch(*(t.to(device) for t in (batch.input_ids, batch.attention_mask,
                                                             batch.count_mask, batch.stat_rows)))
                decoder(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask,
                        use_cache=False)
        self.batch = None


def record_language(handle: ModelHandle, sentences: list[str], max_tokens: int, n_stat: int,
                    add_bos: bool, batch_size: int, desc: str = "record"):
    """Counts, token total, sentence total and stat-sentence means [S, L, d] for one language."""
    ids = tokenize(handle.tokenizer, sentences, add_bos)
    n_prefix = 1 if add_bos and handle.tokenizer.bos_token_id is not None else 0
    n_kept = select_under_cap([len(row) - n_prefix for row in ids], max_tokens)
    ids = ids[:n_kept]
    n_stat = min(n_stat, n_kept)
    recorder = ActivationRecorder(handle, n_stat)
    recorder.run(make_batches(ids, n_prefix, n_stat, batch_size, handle.tokenizer.pad_token_id), desc)
    n_tokens = sum(len(row) - n_prefix for row in ids)
    return recorder.counts.cpu(), n_tokens, n_kept, recorder.means.cpu()


def language_stats(handle: ModelHandle, sentences: list[str], max_tokens: int, n_stat: int, add_bos: bool,
                   batch_size: int, desc: str = "record") -> dict[str, torch.Tensor]:
    """One language's statistics as tensors (the unit the artifact cache stores)."""
    counts, n_tokens, n_sentences, means = record_language(handle, sentences, max_tokens, n_stat, add_bos,
                                                           batch_size, desc)
    return {"counts": counts, "tokens": torch.tensor(n_tokens), "sentences": torch.tensor(n_sentences),
            "p_max": means.max(dim=0).values, "p_median": means.median(dim=0).values,
            "always_active": (means > 0).all(dim=0)}


def stack_languages(stats: dict[str, dict[str, torch.Tensor]]) -> Recording:
    """Per-language stats (code -> language_stats output) -> one Recording, languages in order."""
    field = lambda name: torch.stack([s[name] for s in stats.values()])  # noqa: E731
    return Recording(languages=list(stats), counts=field("counts"), tokens=field("tokens"),
                     sentences=field("sentences"), p_max=field("p_max"), p_median=field("p_median"),
                     always_active=field("always_active"))
