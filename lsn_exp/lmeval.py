"""The lm-eval adapter shared by every evaluation: our task directory, HFLM on a (patched) model in memory,
and task runs that never reuse a response across patches (its fast causal path: ``lsn_exp.sharedprompts``).

- ``task_manager``: a TaskManager over ``lsn_exp/tasks/`` (LSS, local XCOPA/XWinograd, FLORES ...), with
  lm-eval's own tasks only when asked for (indexing them takes seconds).
- ``hflm``: ``LsnHFLM(pretrained=handle.model)``. The Patch edits that model in place, so one HFLM serves
  every patch of a job. No CachingLM (``use_cache``) anywhere: a cached response would belong to
  whatever patch was active when it was written. Its generate_until decodes under ``decoding.greedy_config``.
- ``loglikelihoods``: a task's (or any) loglikelihood requests, deduplicated, in one batched call.
- ``run_tasks``: ``simple_evaluate`` on an LM object with response and request caches off.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.models.huggingface import HFLM

from lsn_exp import decoding
from lsn_exp import sharedprompts
from lsn_exp.sharedprompts import PAD_ID, score_shared_prompts
from lsn_exp.taskindex import TASKS_DIR

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from lsn_exp.models import ModelHandle

log = logging.getLogger(__name__)

def task_manager(metadata: dict[str, Any] | None = None, include_defaults: bool = False,
                 extra_path: str | None = None) -> TaskManager:
    """Tasks from ``lsn_exp/tasks/`` (plus lm-eval's own with ``include_defaults``, and ``extra_path``'s).

    ``metadata`` reaches every task's ``custom_dataset`` as keyword arguments (e.g. data_root, n_facts).
    """
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_quiet)
    paths = [str(TASKS_DIR)] + ([extra_path] if extra_path else [])
    return TaskManager(include_path=paths, include_defaults=include_defaults, metadata=metadata or {})


_EXPECTED = ("Custom kwargs can be passed",  # per task: custom_dataset kwargs may come from --metadata (they do)
             "model kwarg is not of type `str`", "Passed an already-initialized model")  # HFLM on our model


def _quiet(record: logging.LogRecord) -> bool:
    """Drop lm-eval's warnings about what we do on purpose; every other warning passes."""
    return not any(text in record.getMessage() for text in _EXPECTED)


class LsnHFLM(HFLM):
    """HFLM on an in-memory model, with a faster causal scoring path that gives the same scores.

    Shared prompts (the default path): requests are grouped by context. Each distinct context runs once
    (left-padded batch, KV cache kept); its last position scores every continuation's first token, and the
    continuations' remaining tokens run on a copy of that cache, sorted by length. LSS asks for 2 or 15
    objects per prompt and XCOPA for 2 choices, so most of the prompt compute is shared; logits are only
    computed where a token is read (with a 262k vocabulary the LM head is a large part of the cost).
    Scores match HFLM's to fp32 batch-layout noise (tested to 1e-5 nats on tiny models; up to 1e-4 on
    Gemma-3-270M's long continuations, below the LSS tolerance of 1e-3).

    Whole rows (HFLM's layout) are used when a test-time statistic patch is active (its statistic is taken
    over each scored row: prompt and continuation), for encoder-decoder models, and for requests longer than
    the context window. Two differences from HFLM's own call remain there:
    1. It passes an attention mask for the right-padded batch (HFLM passes none). Scores of real tokens
       do not need it (padding is on the right of a causal model), but a test-time statistic patch
       (``patch.stat``) reads the mask to keep padding out of each sample's statistic.
    2. It asks the model for logits only at the positions HFLM reads (each row's continuation; a boolean
       ``logits_to_keep``). The result starts at the batch's first read position (HFLM's slicing treats
       dropped leading positions like virtual tokens) and holds zeros where no row reads, so every score
       comes from the same position.
    Both need each row's real length and continuation length. They come from the requests of the current
    call, keyed by the row's tokens; a row that cannot be matched (or requests that contain the pad id 0,
    which would make the padding ambiguous) fall back to HFLM's plain call, with a warning.
    """

    share_prompts = True  # False: always score whole rows (benchmarks compare the two; ``whole_rows``)
    scoring_processes = 1  # forked workers sharing the shared-prompt batches (hflm sets the handle's)
    handle: ModelHandle | None = None  # the model's handle (hflm sets it): what is hooked on the model now
    # Per-call state of the whole-row path: set by _loglikelihood_tokens for one call and cleared when it
    # returns. Each row HFLM will build (its ``inp`` tokens) -> the longest continuation scored in it;
    # _model_call reads it to rebuild the row's attention mask and the positions whose logits are read.
    _rows: dict[tuple[int, ...], int] | None = None
    _warned = False  # one warning per LM when a call falls back to HFLM's plain forward

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self._can_share_prompts(requests):
            scores = score_shared_prompts(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                          int(override_bs or self.batch_size), disable_tqdm=disable_tqdm or
                                          self.rank != 0, processes=self.scoring_processes
                                          if len(requests) >= sharedprompts.FORK_MIN_REQUESTS else 1)
            for (pair, _, _), answer in zip(requests, scores):
                if pair is not None:
                    self.cache_hook.add_partial("loglikelihood", pair, answer)
            return scores
        rows: dict[tuple[int, ...], int] | None = {}
        if self.backend != "causal":
            rows = None
        for _, context, continuation in requests if rows is not None else ():
            if PAD_ID in context or PAD_ID in continuation:
                self._warn(f"a request contains token id {PAD_ID} (lm-eval's padding): scoring without an "
                           "attention mask and with full logits (a patch.stat patch then sees padding)")
                rows = None
                break
            key = tuple((context + continuation)[-(self.max_length + 1):][:-1])  # HFLM's inp
            rows[key] = max(rows.get(key, 0), len(continuation))
        self._rows = rows
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._rows = None

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None or labels is not None or not self._rows:
            return super()._model_call(inps, attn_mask, labels)
        width = inps.shape[1]
        lengths, conts = [], []
        for row in inps.tolist():  # [B, T] right-padded with PAD_ID
            length = width
            while length and row[length - 1] == PAD_ID:
                length -= 1
            cont = self._rows.get(tuple(row[:length]))
            if cont is None:
                self._warn("a batch row matches no request: plain HFLM call for this batch")
                return super()._model_call(inps)
            lengths.append(length)
            conts.append(cont)
        positions = torch.arange(width, device=inps.device)[None, :]  # [1, T]
        ends = torch.tensor(lengths, device=inps.device)[:, None]  # [B, 1]
        mask = (positions < ends).long()  # [B, T] attention mask
        read = (positions >= ends - torch.tensor(conts, device=inps.device)[:, None]) & (positions < ends)  # [B, T]
        first = min(length - cont for length, cont in zip(lengths, conts))  # first position any row reads
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            kept = self.model(input_ids=inps, attention_mask=mask, logits_to_keep=read).logits  # [n_read, V]
        logits = kept.new_zeros(len(lengths), width - first, kept.shape[-1])  # [B, T - first, V]
        logits[read[:, first:]] = kept  # positions nobody reads stay 0 (HFLM slices them away)
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """HFLM's generate_until decoding under ``decoding.greedy_config`` (the request's own settings and stop
        sequences on top), so none of the model's generation config (a repetition_penalty ...) applies; each
        row's tokens from its first stop id on become padding, which decodes to nothing."""
        if self.backend != "causal":
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        from lm_eval.models.utils_hf import stop_sequences_criteria

        if generation_kwargs.get("temperature", 0.0) == 0.0 and not generation_kwargs.get("do_sample"):
            generation_kwargs.pop("temperature", None)  # lm-eval's way of asking for greedy
        width = context.shape[1]
        config = decoding.greedy_config(self.model, self.tokenizer, max_length - width)
        inputs = config.update(**generation_kwargs)  # what is not a decoding setting (attention_mask) is an input
        criteria = stop_sequences_criteria(self.tokenizer, stop, width, context.shape[0])
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            out = decoding.greedy_generate(self.model, config, input_ids=context, stopping_criteria=criteria, **inputs)
        out[:, width:][decoding.ended(out[:, width:], config.eos_token_id)] = self.tokenizer.pad_token_id
        return out

    def _can_share_prompts(self, requests) -> bool:
        if not self.share_prompts or self.backend != "causal" or not requests:
            return False
        if self.handle is not None and self.handle.reads_whole_rows:
            return False
        return all(len(ctx) and len(cont) and len(ctx) + len(cont) <= self.max_length + 1
                   for _, ctx, cont in requests)

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True


class DownstreamLM(LsnHFLM):
    """LsnHFLM whose rolling log-likelihoods encode the text without special tokens, so a sentence is scored
    given one BOS (lm-eval's prefix token). HFLM encodes with the tokenizer's default, which for Gemma adds a
    BOS of its own, and then also scores log P(BOS | BOS) as part of every sentence."""

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        saved = self.add_bos_token
        self.add_bos_token = False
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.add_bos_token = saved


@contextmanager
def whole_rows(lm: LsnHFLM, on: bool = True):
    """Inside, ``lm`` scores whole rows when ``on`` (the layout a test-time statistic patch forces), patched or
    not: a run paired with a patched run (LSS in 16 bits) then has that run's layout, not the shared prompts'."""
    saved = lm.share_prompts
    lm.share_prompts = saved and not on
    try:
        yield lm
    finally:
        lm.share_prompts = saved


def hflm(handle: ModelHandle, batch_size: int | None = None, lm_class: type[LsnHFLM] = LsnHFLM) -> LsnHFLM:
    """lm-eval's HF model around ``handle.model`` (patched in place by ``Patch``). Log-softmax runs in float32
    whatever the model dtype: in bf16 it rounds log-probs near large logits to steps of 0.06-0.125 nats."""
    logging.getLogger("lm_eval.models.huggingface").addFilter(_quiet)
    lm = lm_class(pretrained=handle.model, tokenizer=handle.tokenizer, batch_size=int(batch_size or handle.batch_size),
                  logits_cache=True, softmax_dtype=torch.float32)
    lm.scoring_processes, lm.handle = handle.scoring_processes, handle
    return lm


def build_instances(task) -> list[Instance]:
    """The task's requests (0-shot, all docs), built fresh: lm-eval's request cache stays off."""
    task.build_all_requests(cache_requests=False)
    return list(task.instances)


def loglikelihoods(lm, instances: list[Instance], disable_tqdm: bool = True) -> list[float]:
    """Summed continuation log-prob of each loglikelihood request, through ``lm.loglikelihood`` (batched,
    sorted by length by lm-eval). Identical (context, continuation) pairs are scored once."""
    from lm_eval.api.instance import Instance

    unique: dict[tuple[str, str], int] = {}
    for inst in instances:
        unique.setdefault(tuple(inst.args), len(unique))
    if not unique:
        return []
    requests = [Instance("loglikelihood", {}, args, 0) for args in unique]
    scores = [ll for ll, _greedy in lm.loglikelihood(requests, disable_tqdm=disable_tqdm)]
    return [scores[unique[tuple(inst.args)]] for inst in instances]


def run_tasks(lm, tasks: list[str], manager: TaskManager, limit: int | float | None = None,
              num_fewshot: int | None = None, log_samples: bool = False, bootstrap_iters: int = 1000,
              **kwargs) -> dict:
    """``simple_evaluate`` on ``lm`` with no response cache (``use_cache=None``) and no request cache, so
    every call scores the model as it is now (patched or not)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                           num_fewshot=num_fewshot, use_cache=None, cache_requests=False,
                           log_samples=log_samples, bootstrap_iters=bootstrap_iters, **kwargs)
