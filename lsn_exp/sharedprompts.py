"""Shared-prompt scoring: log P(continuation | context) for many (context, continuation) token pairs, each
distinct context run once (left-padded batch, KV cache kept) and its continuations scored on copies of that cache.

``lsn_exp.lmeval.LsnHFLM`` routes lm-eval's causal log-likelihood requests here; the scores match HFLM's whole
rows to fp32 batch-layout noise.
"""

from __future__ import annotations

import torch

from lsn_exp.forkmap import forked_map

PAD_ID = 0  # lm-eval's pad_and_concat right-pads causal batches with token id 0

FORK_MIN_REQUESTS = 256  # fewer requests are scored in one process: a fork (~10-50 ms) would cost more
CONT_ROWS_PER_CONTEXT = 4  # continuation rows per forward: up to this x batch_size (LSS objects are short) ...
CONT_TOKENS_PER_ROW = 32  # ... and at most batch_size x this padded positions (long rows: rolling windows)


def score_shared_prompts(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                         disable_tqdm: bool = True, processes: int = 1) -> list[tuple[float, bool]]:
    """(summed log P(continuation | context), greedy?) for each (context tokens, continuation tokens) pair.

    Each distinct context is run once; see ``LsnHFLM``. Identical pairs are scored once. ``processes`` > 1
    shares the batches with forked workers (``forkmap``); every batch is the same either way.
    """
    from tqdm import tqdm

    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        groups.setdefault(tuple(ctx), {}).setdefault(tuple(cont), []).append(i)
    contexts = sorted(groups, key=lambda c: (-len(c), c))  # similar widths share a batch
    chunks = [contexts[start: start + batch_size] for start in range(0, len(contexts), batch_size)]
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    with tqdm(total=len(pairs), desc="loglikelihood (shared prompts)", disable=disable_tqdm) as bar:
        def keep(chunk, answers: dict) -> None:
            for (ctx, cont), answer in answers.items():
                for i in groups[ctx][cont]:
                    results[i] = answer
                bar.update(len(groups[ctx][cont]))

        forked_map(lambda chunk: _score_context_batch(model, chunk, groups, batch_size), chunks, processes, keep)
    return results  # type: ignore[return-value]


def _score_context_batch(model, contexts: list[tuple[int, ...]], groups: dict, batch_size: int) -> dict:
    """Scores of every continuation of ``contexts``: one cached forward over the contexts, then the
    continuations' later tokens on cache copies, longest first."""
    device = model.device
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for b, ctx in enumerate(contexts):  # left padding: every context ends at the last position
        ids[b, width - len(ctx):] = torch.tensor(ctx)
        mask[b, width - len(ctx):] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
    first_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V] fp32: each continuation's first token
    first_greedy = first_lp.argmax(dim=-1).tolist()
    rows = [(b, cont) for b, ctx in enumerate(contexts) for cont in groups[ctx]]
    scores = {(contexts[b], cont): [float(first_lp[b, cont[0]]), first_greedy[b] == cont[0]] for b, cont in rows}
    rest = sorted((r for r in rows if len(r[1]) > 1), key=lambda r: -len(r[1]))
    for sub in _row_batches(rest, batch_size):
        for (b, cont), (lp, greedy) in zip(sub, _continuation_scores(model, out.cache, mask,
                                                                      [len(c) for c in contexts], sub)):
            score = scores[(contexts[b], cont)]
            score[0] += lp
            score[1] = score[1] and greedy
    return {key: (value[0], bool(value[1])) for key, value in scores.items()}


def _row_batches(rows: list, batch_size: int):
    """Longest-first rows in batches of at most batch_size x CONT_ROWS_PER_CONTEXT rows and
    batch_size x CONT_TOKENS_PER_ROW padded positions (at least one row each)."""
    start = 0
    while start < len(rows):
        width = len(rows[start][1]) - 1  # the longest row of this batch sets its width
        n = max(1, min(batch_size * CONT_ROWS_PER_CONTEXT, batch_size * CONT_TOKENS_PER_ROW // max(width, 1)))
        yield rows[start: start + n]
        start += n


def _continuation_scores(model, cache, context_mask: torch.Tensor, context_lens: list[int],
                         rows: list[tuple[int, tuple[int, ...]]]) -> list[tuple[float, bool]]:
    """Tokens 2.. of each continuation (row = (context index, continuation)) read from a copy of the
    contexts' cache: log-probs summed in float32, and whether each token was the argmax."""
    device = context_mask.device
    length = max(len(cont) for _, cont in rows) - 1
    index = torch.tensor([b for b, _ in rows], device=device)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    real = torch.zeros((len(rows), length), dtype=torch.bool)
    for r, (_, cont) in enumerate(rows):  # feed cont[:-1] after the context, read cont[1:]
        ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
        real[r, : len(cont) - 1] = True
    ids, real = ids.to(device), real.to(device)
    positions = torch.tensor([context_lens[b] for b, _ in rows], device=device)[:, None] + torch.arange(
        length, device=device)  # [R, L]
    mask = torch.cat([context_mask[index], real.long()], dim=1)  # [R, W + L]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       cache=_select_rows(cache, index), use_cache=True, logits_to_keep=real).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n_read, V] fp32, rows in order, positions in order
    targets = torch.tensor([t for _, cont in rows for t in cont[1:]], device=device)
    token_lp = logprobs.gather(1, targets[:, None])[:, 0]
    token_greedy = logprobs.argmax(dim=-1) == targets
    out, offset = [], 0
    for _, cont in rows:
        n = len(cont) - 1
        out.append((float(token_lp[offset: offset + n].sum()), bool(token_greedy[offset: offset + n].all())))
        offset += n
    return out


def _select_rows(cache, index: torch.Tensor):
    """A shallow copy of a KV cache holding rows ``index`` (with repeats); the original stays as it is."""
    import copy

    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(index)
    return selected
