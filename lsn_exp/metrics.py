"""Every statistic a result carries: LSS cells and their bootstraps, chrF++/BLEU corpus statistics, paired
deltas of downstream metrics, intervals and paired tests of prompt shares. numpy, scipy and sacrebleu only (no
torch, no lm-eval).

LSS cell (source s, target t) from per-fact shifts Δ(patched toward t) − Δ(unpatched), where
Δ = log P(obj_t | prompt_s) − log P(obj_s | prompt_s): ``lss`` counts a shift above ``tol``, ``lss_paper``
any shift above 0 (the paper's rule, on requests in the paper's format: lsn_exp.lss).

Downstream metrics are functions of per-document statistics that are summed (``metric_stats``), so a
score never depends on batching: mean metrics (acc, lang_share, empty_share) get the analytic stderr,
corpus metrics (chrF++, BLEU, perplexities) a bootstrap over documents with the same resamples for the
patched and the unpatched run (a paired delta).
"""

from __future__ import annotations

import importlib.util
import math
import os
from functools import cache

import numpy as np
from scipy.stats import binomtest, false_discovery_control

from lsn_exp.data import LSS_LANGS
from lsn_exp.results import LssCell, MetricDelta, num

# --- LSS -------------------------------------------------------------------------------------------------

OUTCOME = {True: "1", False: "0", None: "s"}  # per fact in a cell: win, no win, skipped (same-string objects)


def lss_cell(source: str, target: str, shift, tol: float, n_boot: int, seed: int, paper_shift=None) -> LssCell:
    """One cell from the per-fact shifts (NaN: skipped, the two objects are the same string).

    ``lss`` (ours): wins (shift > tol) / scored facts; skipped facts leave the denominator. ``lss_paper``: the
    paper's rule (tauimbz/lang-task-neuron intervention_dod.py ``eval_dod``: ``sum(diff > 0) / len(preds)``),
    wins (shift > 0) / all facts, a same-string fact a non-win (its shift is exactly 0 there); ``paper_shift``
    are the shifts of the paper-format requests (default: ``shift``, where both formats are the same requests).
    Each with a bootstrap 95% CI over facts.
    """
    shift = np.asarray(shift, dtype=np.float64)
    paper_shift = shift if paper_shift is None else np.asarray(paper_shift, dtype=np.float64)
    scored = ~np.isnan(shift)
    wins = np.where(scored, shift > tol, False)
    paper_wins = np.nan_to_num(paper_shift, nan=0.0) > 0
    n, total = int(scored.sum()), int(shift.size)
    rng = np.random.default_rng([seed, LSS_LANGS.index(source), LSS_LANGS.index(target)])
    lss, (lo, hi) = _mean(wins[scored]), bootstrap_ci(wins[scored].astype(np.float64), n_boot, rng)
    paper, (paper_lo, paper_hi) = _mean(paper_wins), bootstrap_ci(paper_wins.astype(np.float64), n_boot, rng)
    return LssCell(source=source, target=target, n=n, skipped=total - n, wins=int(wins.sum()),
                   within_tol=int((np.abs(shift[scored]) <= tol).sum()),
                   outcomes="".join(OUTCOME[bool(w) if s else None] for w, s in zip(wins, scored)),
                   lss=lss, ci_low=lo, ci_high=hi, lss_paper=paper, lss_paper_ci_low=paper_lo,
                   lss_paper_ci_high=paper_hi, mean_shift=float(shift[scored].mean()) if n else float("nan"),
                   wins_paper=int(paper_wins.sum()), outcomes_paper="".join("1" if w else "0" for w in paper_wins))


def _mean(values) -> float:
    return float(values.mean()) if values.size else float("nan")


def bootstrap_ci(values, n_boot: int, rng) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` over ``n_boot`` resamples (NaN when empty)."""
    if values.size == 0:
        return float("nan"), float("nan")
    boot = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1) if n_boot > 0 \
        else np.array([values.mean()])
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def fact_bootstrap(cells, n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]] | None:
    """95% CIs of the mean LSS over ``cells`` (and of ``lss_paper``), resampling facts, not cells.

    The cells of a model x factor share their facts (every source prompts the same sample, every target patches
    it), so one resample of facts recomputes every cell, and the mean over cells, from it. Needs each cell's
    ``outcomes`` over one common sample; None otherwise.
    """
    outcomes = [c.outcomes or "" for c in cells]
    n_facts = len(outcomes[0]) if outcomes else 0
    if not n_facts or any(len(o) != n_facts for o in outcomes):
        return None
    wins = np.array([[ch == "1" for ch in o] for o in outcomes], dtype=np.float64)  # [C, N]
    scored = np.array([[ch != "s" for ch in o] for o in outcomes], dtype=np.float64)  # [C, N]
    # the paper's rule has its own outcomes; results written before it (no outcomes_paper) used ours
    paper_outcomes = [getattr(c, "outcomes_paper", "") or o for c, o in zip(cells, outcomes)]
    paper_wins = np.array([[ch == "1" for ch in o] for o in paper_outcomes], dtype=np.float64)  # [C, N]
    draws = np.random.default_rng(seed).integers(0, n_facts, size=(n_boot, n_facts))
    counts = np.stack([np.bincount(row, minlength=n_facts) for row in draws]).T.astype(np.float64)  # [N, B]
    won, seen = wins @ counts, scored @ counts  # [C, B]
    with np.errstate(invalid="ignore", divide="ignore"):
        lss = np.nanmean(np.where(seen > 0, won / seen, np.nan), axis=0)  # [B]
    paper = (paper_wins @ counts / n_facts).mean(axis=0)
    return {name: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)))
            for name, v in (("lss", lss), ("lss_paper", paper))}


# --- translation: chrF++ and BLEU through sacrebleu --------------------------------------------------------

@cache
def bleu_tokenizer(lang: str) -> str:
    """sacrebleu tokenizer for BLEU into ``lang``: zh -> 'zh'; ja -> 'ja-mecab' when MeCab is installed, else
    'char'; th -> 'flores200' when sentencepiece and its model are already on disk (never downloaded),
    else 'char'; every other language -> '13a' (sacrebleu's default)."""
    if lang == "zh":
        return "zh"
    if lang == "ja":
        return "ja-mecab" if _works("ja-mecab") else "char"
    if lang == "th":
        return "flores200" if _spm_model_on_disk("flores200") and _works("flores200") else "char"
    return "13a"


def _works(tokenize: str) -> bool:
    from sacrebleu.metrics import BLEU

    try:
        BLEU(tokenize=tokenize).corpus_score(["a b"], [["a b"]])
        return True
    except Exception:  # noqa: BLE001 - a missing optional dependency
        return False


def _spm_model_on_disk(key: str) -> bool:
    if importlib.util.find_spec("sentencepiece") is None:
        return False
    from sacrebleu.tokenizers.tokenizer_spm import SPM_MODELS
    from sacrebleu.utils import SACREBLEU_DIR

    return os.path.exists(os.path.join(SACREBLEU_DIR, "models", os.path.basename(SPM_MODELS[key]["url"])))


@cache
def _mt_metric(metric: str, lang: str):
    from sacrebleu.metrics import BLEU, CHRF

    if metric == "chrf++":
        return CHRF(word_order=2)
    if metric == "bleu":
        return BLEU(tokenize=bleu_tokenizer(lang))
    raise KeyError(metric)


def sentence_stats(metric: str, preds, refs, lang: str):
    """Per-sentence sufficient statistics, int64 [N, K]; their column sums give the corpus score.

    sacrebleu has no public API for them: this is the private call its own ``corpus_score`` makes."""
    stats = _mt_metric(metric, lang)._extract_corpus_statistics(list(preds), [list(refs)])
    return np.asarray(stats, dtype=np.int64).reshape(len(preds), -1)


def score_from_stats(metric: str, stats, lang: str) -> float:
    """The corpus score from summed statistics: BLEU through sacrebleu's public ``BLEU.compute_bleu``, chrF++
    through the private ``_compute_score_from_stats`` (chrF has no public equivalent)."""
    scorer, stats = _mt_metric(metric, lang), [int(x) for x in stats]
    if metric == "bleu":
        order = scorer.max_ngram_order
        return float(scorer.compute_bleu(
            correct=stats[2: 2 + order], total=stats[2 + order:], sys_len=stats[0], ref_len=stats[1],
            smooth_method=scorer.smooth_method, smooth_value=scorer.smooth_value,
            effective_order=scorer.effective_order, max_ngram_order=order).score)
    return float(scorer._compute_score_from_stats(stats).score)


def corpus_score(metric: str, preds, refs, lang: str) -> float:
    """Corpus chrF++ or BLEU (one reference per sentence), the same as sacrebleu's corpus_score."""
    return score_from_stats(metric, sentence_stats(metric, preds, refs, lang).sum(0), lang)


# --- downstream metrics: per-document statistics -> value -> paired delta ---------------------------------

MEAN_METRICS = ("acc", "lang_share", "empty_share")  # means of per-document values: analytic stderr
HIGHER_IS_BETTER = {"acc": True, "lang_share": True, "empty_share": False, "chrf++": True, "bleu": True,
                    "ll_per_token": True, "ppl": False, "bits_per_byte": False}


def metric_stats(kind: str, metrics: tuple[str, ...], lang: str, tensors: dict, texts: dict) -> dict:
    """metric -> per-document statistics [N, K] whose column sums determine the metric (``metric_value``).

    ``kind``: mc (tensors: correct), mt (tensors: match; texts: predictions, references) or ppl
    (tensors: ll, n_tokens, n_bytes)."""
    if kind == "lm_eval":  # any lm-eval metric: the mean of its per-document values
        return {metric: np.c_[values, np.ones(len(values))] for metric, values in tensors.items()}
    if kind == "mc":
        correct = tensors["correct"]
        return {"acc": np.c_[correct, np.ones(len(correct))]}
    if kind == "mt":
        preds, refs = texts["predictions"], texts["references"]
        ones = np.ones(len(preds))
        return {"chrf++": sentence_stats("chrf++", preds, refs, lang),
                "bleu": sentence_stats("bleu", preds, refs, lang),
                "lang_share": np.c_[tensors["match"], ones],
                "empty_share": np.c_[[float(p == "") for p in preds], ones]}
    stats = np.c_[tensors["ll"], tensors["n_tokens"], tensors["n_bytes"]]
    return {metric: stats for metric in metrics}


def is_mean(metric: str) -> bool:
    """A mean of per-document values: ours, and every lm-eval metric we do not define ourselves."""
    return metric in MEAN_METRICS or metric not in HIGHER_IS_BETTER


def metric_value(metric: str, sums, lang: str) -> float:
    """A metric from its summed statistics (see metric_stats)."""
    if is_mean(metric):
        return float(sums[0] / sums[1])
    if metric in ("chrf++", "bleu"):
        return score_from_stats(metric, sums, lang)
    ll, n_tokens, n_bytes = (float(x) for x in sums)
    if metric == "ll_per_token":
        return ll / n_tokens
    if metric == "ppl":
        return math.exp(-ll / n_tokens)
    if metric == "bits_per_byte":
        return -ll / (n_bytes * math.log(2))
    raise KeyError(metric)


def paired_delta(metric: str, patched, unpatched, lang: str, n_boot: int, rng) -> MetricDelta:
    """value ± stderr for the patched and the unpatched statistics [N, K], and the delta ± its paired stderr."""
    n = len(patched)
    value, base = metric_value(metric, patched.sum(0), lang), metric_value(metric, unpatched.sum(0), lang)
    if is_mean(metric):
        x, y = patched[:, 0].astype(float), unpatched[:, 0].astype(float)
        se = (lambda v: float(np.std(v, ddof=1) / math.sqrt(n))) if n > 1 else (lambda v: float("nan"))
        errors = se(x), se(y), se(x - y)
    elif n_boot > 0 and n > 1:
        counts = np.stack([np.bincount(row, minlength=n) for row in rng.integers(0, n, size=(n_boot, n))])  # [B, n]
        vp = np.array([metric_value(metric, s, lang) for s in counts @ patched])
        vb = np.array([metric_value(metric, s, lang) for s in counts @ unpatched])
        errors = float(np.std(vp, ddof=1)), float(np.std(vb, ddof=1)), float(np.std(vp - vb, ddof=1))
    else:
        errors = float("nan"), float("nan"), float("nan")
    return MetricDelta(value=num(value), stderr=num(errors[0]), base=num(base), base_stderr=num(errors[1]),
                       delta=num(value - base), delta_stderr=num(errors[2]))


# --- shares of prompts: intervals and paired tests (scipy.stats) ----------------------------------------------

CONFIDENCE = 0.95
WIDE = 0.10  # a share's interval half-width above this is flagged as wide in tables


def share_interval(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of ``hits`` / ``n`` (scipy.stats.binomtest(...).proportion_ci, method wilson);
    (nan, nan) when n is 0."""
    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(hits), int(n)).proportion_ci(CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def half_width(interval) -> float:
    lo, hi = interval
    return (hi - lo) / 2


def mcnemar_exact(a: str, b: str) -> dict:
    """Exact McNemar test of two methods' per-prompt outcomes on the same prompts (``a``, ``b``: strings of
    "1"/"0", one character per prompt, in the same order): the two-sided binomial test of the discordant pairs
    (scipy.stats.binomtest with p = 0.5). Returns the shares, their difference, the discordant counts and p."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    n = len(a)
    share_a, share_b = (a.count("1") / n, b.count("1") / n) if n else (float("nan"), float("nan"))
    return {"n": n, "share_a": share_a, "share_b": share_b, "difference": share_a - share_b, "only_a": only_a,
            "only_b": only_b, "p": float(p)}


def false_discovery(pvalues: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values of one family of tests (scipy.stats.false_discovery_control)."""
    if not pvalues:
        return []
    return [float(q) for q in false_discovery_control(np.asarray(pvalues, dtype=np.float64))]
