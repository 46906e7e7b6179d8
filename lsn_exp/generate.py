"""Free generation under an intervention: steering success and fluency, one definition for every method.

- label: the continuation's language by ``generate.lid`` among the recorded languages (``lid.identify``); a label
  counts for a target under ``lid.counts_as`` (id and ms count for each other)
- repetition: the share of repeated character n-grams in the continuation, whitespace removed, so it works
  for every script (``alıkalıkalık``, ``、、、、`` and ``แรกแรกแรก`` are one "word" each and score near 1)
- nll: the continuation's mean negative log-likelihood per token under the *unpatched* model after the plain
  prompt (a prompt baseline's prefix left out; its exp is the perplexity): a method that babbles pays here
- decoding: greedy, one explicit config for every method (``decoding.greedy_config``), ended at any stop id;
  the model runs through its engine (``lsn_exp.engine``)
- steering success: the share of continuations labelled as the target *and* not degenerate (repetition at most
  ``max_repetition``); the raw share is reported beside it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from lsn_exp import lid, metrics
from lsn_exp.engine import engine_of
from lsn_exp.models import device_key
from lsn_exp.prompts import prompt_split

GENERATE_VERSION = 2  # bump when the cached unpatched continuations would be generated or scored differently
UNPATCHED_KIND = "generate_unpatched"


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    label: str  # ISO 639-1 code of the continuation (lid.identify), "-" when empty
    repetition: float = 0.0  # share of repeated character n-grams (0: none repeats)
    nll: float | None = None  # mean NLL per continuation token under the unpatched model (None: not scored)


def repetition_rate(text: str, n: int = 4) -> float:
    """1 - distinct / all character n-grams of ``text`` without whitespace (0 when shorter than n)."""
    chars = "".join(text.split())
    grams = [chars[i: i + n] for i in range(len(chars) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def generate_labelled(handle, prompts, max_new_tokens: int = 25, patch=None, repetition_n: int = 4,
                      fluency: bool = True, prefix: str = "", identifier: str = lid.DEFAULT) -> list[Generation]:
    """Continuations under ``patch`` (any intervention context manager; None: unpatched) of ``prefix`` + each
    prompt, each labelled, with its repetition rate and (``fluency``) its NLL under the unpatched model after the
    plain prompt (without ``prefix``), as every method's."""
    engine = engine_of(handle)
    with patch if patch is not None else nullcontext():
        generated = engine.generate([prefix + p for p in prompts], max_new_tokens)
    texts = generated.texts
    nll = engine.continuation_nll(list(prompts), generated) if fluency else [None] * len(texts)
    return [Generation(p, t, label, repetition_rate(t, repetition_n), n)
            for p, t, label, n in zip(prompts, texts, lid.identify(texts, identifier=identifier), nll)]


def relabelled(generations: list[Generation], identifier: str) -> list[Generation]:
    """``generations`` labelled anew by ``identifier`` (cached ones may carry another identifier's labels)."""
    labels = lid.identify([g.text for g in generations], identifier=identifier)
    return [replace(g, label=label) for g, label in zip(generations, labels)]


def succeeds(generation: Generation, code: str, max_repetition: float | None = None) -> bool:
    """Labelled ``code`` (or its related language, ``lid.counts_as``) and, with ``max_repetition``, at or under that
    repetition rate."""
    return lid.counts_as(generation.label, code) and (max_repetition is None or generation.repetition <= max_repetition)


def share_in(generations: list[Generation], code: str, max_repetition: float | None = None) -> float:
    """The share of ``generations`` that ``succeeds`` toward ``code``."""
    return sum(succeeds(g, code, max_repetition) for g in generations) / max(len(generations), 1)


def fluency_summary(generations: list[Generation], max_repetition: float) -> dict:
    """Mean repetition, the degenerate share and the perplexity (exp of the mean per-token NLL) of a set."""
    scored = [g.nll for g in generations if g.nll is not None]
    return {"repetition": sum(g.repetition for g in generations) / max(len(generations), 1),
            "degenerate_share": sum(g.repetition > max_repetition for g in generations) / max(len(generations), 1),
            "ppl": math.exp(sum(scored) / len(scored)) if scored else None}


def prompt_sets(settings, root) -> dict[str, list[str]]:
    """source language -> the reported prompts of ``settings.domain`` (or those written in the config / a file)."""
    return prompt_split(settings, root).report


def steering(handle, prompts: dict[str, list[str]], target: str, settings, patch=None, prefix: str = "",
             unpatched: dict | None = None, store=None) -> tuple[dict, list]:
    """Unpatched and patched continuations of every source's prompts toward ``target``: per source and overall,
    the raw target share, the steering success (target and not degenerate) and fluency; and one row per prompt.
    The overall ("all") figures leave out the prompts in the target language itself (unless they are all there is).
    ``prefix`` (a prompt baseline) goes before every patched prompt (its continuation is scored after the plain
    one); ``unpatched`` (source -> generations) keeps the unpatched continuations across calls, ``store`` across
    jobs. Labels come from ``settings.lid``, which must cover ``target``."""
    lid.require_covered(settings.lid, target)
    summary, rows = {}, []
    unpatched = fill_unpatched(handle, prompts, settings, {} if unpatched is None else unpatched, store)
    patched = by_source(prompts, generate_labelled(handle, joined(prompts), settings.max_new_tokens, patch,
                                                   settings.repetition_n, prefix=prefix, identifier=settings.lid))
    for source in prompts:
        runs = {"unpatched": unpatched[source], "patched": patched[source]}
        summary[source] = {name: measures(gens, target, settings.max_repetition) for name, gens in runs.items()}
        rows += [[source, b.prompt, b.text, b.label, round(b.repetition, 3), a.text, a.label, round(a.repetition, 3),
                  None if a.nll is None else round(a.nll, 4)] for b, a in zip(runs["unpatched"], runs["patched"])]
    runs = {"unpatched": {source: unpatched[source] for source in prompts}, "patched": patched}
    summary["all"] = {name: measures(counted(by, target), target, settings.max_repetition) for name, by in runs.items()}
    return summary, rows


def counted(by_source: dict[str, list], target: str) -> list:
    """The generations "all" is measured on: prompts already in the target language do not count (unless they
    are all there is)."""
    others = [g for source, gens in by_source.items() if source != target for g in gens]
    return others or [g for gens in by_source.values() for g in gens]


def fill_unpatched(handle, prompts: dict[str, list[str]], settings, unpatched: dict, store=None) -> dict:
    """``unpatched`` (source -> generations) with the unpatched continuations of every source not yet in it,
    generated as one batch, or loaded from ``store`` (they depend only on the model, the prompts and the
    generation settings, so every job and target of a model shares them)."""
    missing = {source: texts for source, texts in prompts.items() if source not in unpatched}
    if not missing:
        return unpatched

    def compute():
        return generations_entry(generate_labelled(handle, joined(missing), settings.max_new_tokens, None,
                                                   settings.repetition_n, identifier=settings.lid))

    if store is None:
        generations = generations_from_entry(*compute())
    else:
        entry = store.get_or_compute(UNPATCHED_KIND, unpatched_spec(handle, missing, settings), compute)
        generations = relabelled(generations_from_entry(entry.tensors, entry.meta), settings.lid)
    unpatched.update(by_source(missing, generations))
    return unpatched


def unpatched_spec(handle, prompts: dict[str, list[str]], settings) -> dict:
    """What the unpatched continuations depend on (their cache key). The whole prompt set is part of it: they
    are generated as one left-padded batch, whose width moves scores by float noise."""
    from importlib.metadata import version

    return {"model": handle.identity, "dtype": str(handle.model.dtype), **device_key(handle), "prompts": prompts,
            "max_new_tokens": settings.max_new_tokens, "repetition_n": settings.repetition_n,
            "generate_version": GENERATE_VERSION, "transformers": version("transformers")}


def generations_entry(generations: list[Generation]) -> tuple[dict, dict]:
    nll = [math.nan if g.nll is None else g.nll for g in generations]
    return ({"nll": torch.tensor(nll, dtype=torch.float64)},
            {"generations": [[g.prompt, g.text, g.label, g.repetition] for g in generations]})


def generations_from_entry(tensors: dict, meta: dict) -> list[Generation]:
    return [Generation(prompt, text, label, repetition, None if math.isnan(nll) else nll)
            for (prompt, text, label, repetition), nll in zip(meta["generations"], tensors["nll"].tolist())]


def joined(prompts: dict[str, list[str]]) -> list[str]:
    """Every source's prompts in one list (generated as one batch: a decoding step reads the weights once)."""
    return [text for texts in prompts.values() for text in texts]


def by_source(prompts: dict[str, list[str]], generations: list) -> dict[str, list]:
    """``generations`` of ``joined(prompts)`` split back per source."""
    split, start = {}, 0
    for source, texts in prompts.items():
        split[source], start = generations[start: start + len(texts)], start + len(texts)
    return split


def measures(generations: list[Generation], target: str, max_repetition: float) -> dict:
    """Shares of the generations with their n and 95% Wilson intervals (lsn_exp.metrics.share_interval), and the
    per-prompt success outcomes ("1"/"0" in prompt order) that paired tests between methods read."""
    n = len(generations)
    success = [succeeds(g, target, max_repetition) for g in generations]
    found = {"n": n, "target_share": share_in(generations, target), "steering_success": sum(success) / max(n, 1),
             **fluency_summary(generations, max_repetition)}
    for key in ("target_share", "steering_success", "degenerate_share"):
        found[f"{key}_ci"] = list(metrics.share_interval(round(found[key] * n), n))
    found["outcomes"] = "".join("1" if hit else "0" for hit in success)
    return found
