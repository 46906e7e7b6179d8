"""The engine seam: everything a stage asks of a model, behind one small interface per model handle.

No stage runs the model itself. It asks ``engine_of(handle)`` to
- ``lm``: score log-likelihoods of (context, continuation) requests and generate greedy continuations, as an
  lm-eval LM (every task, LSS included, goes through lm-eval's request API; ``rolling`` for perplexity tasks);
- ``generate`` greedy continuations of prompts (``decoding.greedy_config``) and ``continuation_nll``: score them
  after other prompts under the model as it is now;
- ``record`` one language's site statistics (gate activations, residual stream) over sentences;
- ``intervene``: apply an intervention (neuron patch, steering vector) for the length of a ``with`` block.

``HFEngine`` runs a transformers model in memory. ``lsn_exp.vllmengine.VLLMEngine`` (engine=vllm) implements the
same methods on a vLLM engine and the job sets ``handle.engine``; nothing in the stages changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

import torch

from lsn_exp import decoding, lmeval
from lsn_exp.record import Prefix, RecordingBar, language_stats
from lsn_exp.steer import intervene

if TYPE_CHECKING:
    from lsn_exp.models import ModelHandle
    from lsn_exp.neuronset import NeuronSet
    from lsn_exp.specs import Intervention, PatchSpec

NLL_ROWS = 16  # continuations scored per forward in continuation_nll


class Engine(Protocol):
    """What a stage may ask of a model (``HFEngine`` is the reference implementation)."""

    def lm(self, batch_size: int | None = None, rolling: bool = False) -> Any: ...

    def generate(self, prompts: list[str], max_new_tokens: int) -> Generated: ...

    def continuation_nll(self, prompts: list[str], generated: Generated) -> list[float | None]: ...

    def generation_config(self, max_new_tokens: int) -> dict: ...

    def record(self, sentences: list[str], max_tokens: int | None, n_stat: int, prefix: Prefix, batch_size: int,
               desc: str = "record", progress: RecordingBar | None = None) -> dict[str, torch.Tensor]: ...

    def intervene(self, neurons: NeuronSet, spec: PatchSpec | Intervention) -> ContextManager: ...


@dataclass(frozen=True)
class Generated:
    """Greedy continuations: their texts, and what the engine needs to score their tokens again (``tokens``:
    HFEngine keeps the new token ids [B, N] and their mask, each row's first stop id and all after it masked)."""

    texts: list[str]
    tokens: Any


def engine_of(handle: ModelHandle) -> Engine:
    """The handle's engine: the one its loader attached, else the transformers model in memory."""
    return handle.engine if handle.engine is not None else HFEngine(handle)


class HFEngine:
    """A transformers model in memory (``handle.model``), patched in place by hooks and weight edits."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle

    def lm(self, batch_size: int | None = None, rolling: bool = False) -> lmeval.LsnHFLM:
        """lm-eval's LM on the model; ``rolling``: rolling log-likelihoods given one BOS (``DownstreamLM``)."""
        return lmeval.hflm(self.handle, batch_size, lmeval.DownstreamLM if rolling else lmeval.LsnHFLM)

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int) -> Generated:
        """Greedy continuations of a left-padded batch (every row decodes in step)."""
        tokenizer = self.handle.tokenizer
        batch = self.left_padded(prompts)
        config = decoding.greedy_config(self.handle.model, tokenizer, max_new_tokens)
        new_tokens = decoding.greedy_generate(self.handle.model, config, **batch)[:, batch["input_ids"].shape[1]:]
        kept = (~decoding.ended(new_tokens, config.eos_token_id)).long()
        texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                 for row, n in zip(new_tokens.tolist(), kept.sum(dim=1).tolist())]
        return Generated(texts, (new_tokens, kept))

    @torch.inference_mode()
    def continuation_nll(self, prompts: list[str], generated: Generated) -> list[float | None]:
        """Mean NLL per token of each continuation after the left-padded ``prompts``, under the model as it is now."""
        new_tokens, kept = generated.tokens
        batch = self.left_padded(prompts)
        sequences = torch.cat([batch["input_ids"], new_tokens], dim=1)
        mask = torch.cat([batch["attention_mask"], kept], dim=1)
        return self._nll(sequences, mask, batch["input_ids"].shape[1])

    def _nll(self, sequences: torch.Tensor, mask: torch.Tensor, width: int) -> list[float | None]:
        if len(sequences) > NLL_ROWS:  # [rows, new, vocab] log-probs: a 262k vocabulary makes 1 GB at 48 rows
            return [nll for start in range(0, len(sequences), NLL_ROWS) for nll in self._nll(
                sequences[start: start + NLL_ROWS], mask[start: start + NLL_ROWS], width)]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.handle.model(input_ids=sequences, attention_mask=mask,
                                   position_ids=positions).logits[:, width - 1:-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, new, V]
        token_lp = logprobs.gather(-1, sequences[:, width:, None])[..., 0]  # [B, new]
        real = mask[:, width:].bool()
        counts = real.sum(dim=1)
        sums = torch.where(real, -token_lp, 0.0).sum(dim=1)
        return [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist())]

    def left_padded(self, prompts: list[str]) -> dict:
        """The tokenized batch of ``prompts``, left-padded, on the model's device."""
        tokenizer = self.handle.tokenizer
        tokenizer.padding_side = "left"
        try:
            return tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.handle.device)
        finally:
            tokenizer.padding_side = "right"

    def generation_config(self, max_new_tokens: int) -> dict:
        """The decoding settings of every continuation (results.json records them)."""
        return decoding.greedy_config_dict(self.handle.model, self.handle.tokenizer, max_new_tokens)

    def record(self, sentences: list[str], max_tokens: int | None, n_stat: int, prefix: Prefix, batch_size: int,
               desc: str = "record", progress: RecordingBar | None = None) -> dict[str, torch.Tensor]:
        return language_stats(self.handle, sentences, max_tokens, n_stat, prefix, batch_size, desc, progress)

    def intervene(self, neurons: NeuronSet, spec: PatchSpec | Intervention) -> ContextManager:
        return intervene(self.handle, neurons, spec)
