"""Stage 1a: record MLP gate activations (``act_fn`` output) on per-language text.

One prefill-only pass per batch through the decoder without its LM head. Hooks accumulate, on the
device and with no host sync:
  counts[l, j]      number of real tokens with act_fn(gate_proj(x))[j] > 0 (int64)
  means[s, l, j]    the mean activation over sentence s's real tokens (first n_stat sentences only)
Counts are int64 and means are accumulated in float32, whatever the model dtype (bf16 on a GPU keeps ~3
significant digits). Real tokens exclude padding and the fixed prefix token every sentence starts with
(``prefix_token``: BOS, or EOS where the tokenizer has no BOS), which keeps sentence tokens off position 0,
the attention-sink position with outlier activations.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from lsn_exp.errors import UserError
from lsn_exp.models import ModelHandle

RECORD_VERSION = 3  # bump when what a recording holds or how it is computed changes (part of its cache key)
PREFIX_CHOICES = ("auto", "bos", "eos", "none")
ALL_ROWS = torch.empty(0)  # ActivationRecorder.stat_pos when every row of the batch is a stat sentence (no copy)


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
    resid_mean: torch.Tensor | None = None  # float32 [K, L, d_model]: mean residual stream after each layer
    resid_norm: torch.Tensor | None = None  # float32 [K, L]: mean L2 norm of a token's residual after each layer


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]: 1 for every token fed to the model
    count_mask: torch.Tensor  # [B, T]: 1 for real tokens only (no padding, no BOS)
    stat_rows: torch.Tensor  # [B]: sentence index among the stat sentences, -1 for the others


@dataclass(frozen=True)
class Prefix:
    """The token fed before every sentence and left out of counts and means (None: no prefix)."""

    token_id: int | None
    token: str | None
    source: str  # bos | eos | token | none

    def as_meta(self) -> dict:
        return {"token_id": self.token_id, "token": self.token, "source": self.source}


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of every text it encodes (Gemma, Llama; not Qwen2.5, SmolLM2)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def prefix_token(tokenizer, setting: str = "auto") -> Prefix:
    """``identify.prefix``: auto (the BOS where the tokenizer adds one to every text, else its EOS: a fixed
    token the model sees between texts), bos, eos, none, or a token string."""
    setting = str(setting)
    choices = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    if setting == "none":
        return Prefix(None, None, "none")
    if setting == "auto":
        setting = "bos" if adds_bos(tokenizer) else "eos"
    if setting in choices:
        token_id = choices[setting]
        if token_id is None:
            raise UserError(f"identify.prefix={setting}: this tokenizer has no {setting.upper()} token; "
                            "use auto, eos, none or a token string")
        return Prefix(int(token_id), tokenizer.convert_ids_to_tokens(int(token_id)), setting)
    ids = tokenizer(setting, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"identify.prefix={setting!r} is {len(ids)} tokens for this tokenizer: use one token, "
                        f"or one of {', '.join(PREFIX_CHOICES)}")
    return Prefix(int(ids[0]), setting, "token")


def tokenize(tokenizer, sentences: list[str], prefix: Prefix) -> list[list[int]]:
    """Each sentence's tokens (no special tokens) after the prefix token, if any."""
    ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    if prefix.token_id is not None:
        ids = [[prefix.token_id, *row] for row in ids]
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


class LanguagePass(NamedTuple):
    """What one language's recording pass gives (counted tokens: no padding, no prefix)."""

    counts: torch.Tensor  # int64 [L, d_ff]: tokens with gate activation > 0
    tokens: int
    sentences: int
    means: torch.Tensor  # float32 [S, L, d_ff]: each stat sentence's mean gate activation
    resid_mean: torch.Tensor  # float32 [L, d_model]: mean residual stream after each layer
    resid_norm: torch.Tensor  # float32 [L]: mean L2 norm of a token's residual after each layer


class RecordingBar:
    """One console bar for a whole recording: languages done (a language advances batch by batch), the language
    being recorded, tokens so far and time left. A language loaded from the cache leaves the total; when every
    language is cached, nothing is shown."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} languages [{elapsed}<{remaining}{postfix}]"

    def __init__(self, n_languages: int):
        self.remaining, self.tokens, self.cached = n_languages, 0, 0
        self.bar, self.code, self.step = None, "", 1.0

    def language(self, code: str, n_batches: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.remaining, desc="record", bar_format=self.FORMAT)
        self.code, self.step = code, 1.0 / max(n_batches, 1)

    def batch(self, n_tokens: int) -> None:
        self.tokens += n_tokens
        cached = f", {self.cached} cached" if self.cached else ""
        self.bar.set_postfix_str(f"{self.code}, {self.tokens:,} tokens{cached}", refresh=False)
        self.bar.update(self.step)

    def finished(self, computed: bool) -> None:
        """One language done: recorded now (``computed``) or loaded from the cache."""
        if computed:
            self.bar.n = round(self.bar.n)
            self.bar.refresh()
            return
        self.cached += 1
        self.remaining -= 1
        if self.bar is not None:
            self.bar.total -= 1
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ActivationRecorder:
    """Forward hooks on every layer's mlp.gate site (counts, stat-sentence means) and resid_post site (the
    residual stream's sum and norm over counted tokens, for DiffMean vectors), accumulated in fp32/int64."""

    def __init__(self, handle: ModelHandle, n_stat: int):
        adapter = handle.adapter
        self.handle = handle
        self.counts = torch.zeros(adapter.n_layers, adapter.d_ff, dtype=torch.int64, device=handle.device)
        self.means = torch.zeros(n_stat, adapter.n_layers, adapter.d_ff, dtype=torch.float32,
                                 device=handle.device)
        self.resid_sum = torch.zeros(adapter.n_layers, handle.model.config.hidden_size, dtype=torch.float32,
                                     device=handle.device)
        self.resid_norm_sum = torch.zeros(adapter.n_layers, dtype=torch.float32, device=handle.device)
        self.batch: Batch | None = None
        self.stat_pos: torch.Tensor | None = None  # batch rows that are stat sentences
        self.stat_ids: torch.Tensor | None = None  # their index among the stat sentences
        self.uncounted: torch.Tensor | None = None  # flat [B*T] positions left out of the counts

    def _count(self, layer: int, output: torch.Tensor) -> None:
        """counts[layer] += positive activations at counted positions: every position, less the few that are
        not counted (prefix, padding). An int32 sum of the bool tensor costs half an int64 masked sum."""
        flat = output.reshape(-1, output.shape[-1])  # [B*T, d_ff]
        positive = (flat > 0).sum(dim=0, dtype=torch.int32)
        if self.uncounted is not None:
            positive -= (flat.index_select(0, self.uncounted) > 0).sum(dim=0, dtype=torch.int32)
        self.counts[layer] += positive

    def _hook(self, layer: int):
        def hook(module, inputs, output):  # output: [B, T, d_ff]
            self._count(layer, output)
            if self.stat_pos is not None:  # decided on the host when the batch was built: no device sync
                weights = self.batch.count_mask.float()  # [B, T] 0/1
                if self.stat_pos is not ALL_ROWS:  # only some rows are stat sentences: take those
                    output, weights = output.index_select(0, self.stat_pos), weights.index_select(0, self.stat_pos)
                sums = torch.einsum("bt,btd->bd", weights, output.float())
                self.means[self.stat_ids, layer] = sums / weights.sum(dim=1, keepdim=True).clamp(min=1)
        return hook

    def _resid_hook(self, layer: int):
        def hook(module, inputs, output):  # output: [B, T, d_model] (or a tuple whose first item it is)
            resid = (output[0] if isinstance(output, tuple) else output).float()
            weights = self.batch.count_mask.float()  # [B, T]
            self.resid_sum[layer] += torch.einsum("bt,btd->d", weights, resid)
            self.resid_norm_sum[layer] += (resid.norm(dim=-1) * weights).sum()
        return hook

    @contextmanager
    def hooked(self):
        adapter = self.handle.adapter
        hooks = [gate.register_forward_hook(self._hook(layer)) for layer, gate in enumerate(adapter.site("mlp.gate"))]
        hooks += [block.register_forward_hook(self._resid_hook(layer))
                  for layer, block in enumerate(adapter.site("resid_post"))]
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()

    @torch.inference_mode()
    def run(self, batches: list[Batch], desc: str, progress: RecordingBar | None = None) -> None:
        """Every batch through the model; the progress shows on ``progress`` (else a bar of its own, ``desc``)."""
        device = self.handle.device
        decoder = self.handle.adapter.decoder
        if progress is not None:
            progress.language(desc.split()[-1], len(batches))
        with self.hooked():
            for batch in batches if progress is not None else tqdm(batches, desc=desc, unit="batch", leave=False):
                positions = batch.stat_rows.ge(0).nonzero().flatten()  # on the host
                self.stat_pos = (None if not len(positions) else ALL_ROWS if len(positions) == len(batch.stat_rows)
                                 else positions.to(device))  # stat sentences have batches of their own: ALL_ROWS
                self.stat_ids = batch.stat_rows[positions].to(device)
                uncounted = batch.count_mask.flatten().eq(0).nonzero().flatten()  # on the host
                self.uncounted = uncounted.to(device) if len(uncounted) else None
                self.batch = Batch(*(t.to(device) for t in (batch.input_ids, batch.attention_mask,
                                                             batch.count_mask, batch.stat_rows)))
                decoder(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask,
                        use_cache=False)
                if progress is not None:
                    progress.batch(int(batch.count_mask.sum()))
        self.batch = None


def record_language(handle: ModelHandle, sentences: list[str], max_tokens: int | None, n_stat: int,
                    prefix: Prefix, batch_size: int, desc: str = "record", progress: RecordingBar | None = None):
    """One language's pass; ``max_tokens`` None records every sentence."""
    ids = tokenize(handle.tokenizer, sentences, prefix)
    n_prefix = 0 if prefix.token_id is None else 1
    lengths = [len(row) - n_prefix for row in ids]
    n_kept = len(ids) if max_tokens is None else select_under_cap(lengths, max_tokens)
    if n_kept == 0:
        raise UserError(f"identify.max_tokens={max_tokens} is below the first {desc.split()[-1]} sentence "
                        f"({lengths[0]} tokens): raise it, or leave it null to record every sentence")
    ids = ids[:n_kept]
    n_stat = min(n_stat, n_kept)
    recorder = ActivationRecorder(handle, n_stat)
    recorder.run(make_batches(ids, n_prefix, n_stat, batch_size, handle.tokenizer.pad_token_id), desc, progress)
    n_tokens = sum(len(row) - n_prefix for row in ids)
    return LanguagePass(recorder.counts.cpu(), n_tokens, n_kept, recorder.means.cpu(),
                        recorder.resid_sum.cpu() / max(n_tokens, 1), recorder.resid_norm_sum.cpu() / max(n_tokens, 1))


def language_stats(handle: ModelHandle, sentences: list[str], max_tokens: int | None, n_stat: int,
                   prefix: Prefix, batch_size: int, desc: str = "record",
                   progress: RecordingBar | None = None) -> dict[str, torch.Tensor]:
    """One language's statistics as tensors (the unit the cache stores)."""
    found = record_language(handle, sentences, max_tokens, n_stat, prefix, batch_size, desc, progress)
    return {"counts": found.counts, "tokens": torch.tensor(found.tokens), "sentences": torch.tensor(found.sentences),
            "p_max": found.means.max(dim=0).values, "p_median": found.means.median(dim=0).values,
            "always_active": (found.means > 0).all(dim=0), "resid_mean": found.resid_mean,
            "resid_norm": found.resid_norm}


def stack_languages(stats: dict[str, dict[str, torch.Tensor]]) -> Recording:
    """Per-language stats (code -> language_stats output) -> one Recording, languages in order."""
    field = lambda name: torch.stack([s[name] for s in stats.values()])  # noqa: E731
    return Recording(languages=list(stats), counts=field("counts"), tokens=field("tokens"),
                     sentences=field("sentences"), p_max=field("p_max"), p_median=field("p_median"),
                     always_active=field("always_active"), resid_mean=field("resid_mean"),
                     resid_norm=field("resid_norm"))
