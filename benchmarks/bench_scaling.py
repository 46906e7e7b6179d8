"""How recording and the LSS matrix scale: time at 1x / 2x / 4x the work, and the fitted exponent.

    .venv/bin/python benchmarks/bench_scaling.py [--model gemma3_270m] [--tokens 2000] [--facts 8] [--langs en,fr,ja]

recording  language_stats on FLORES dev (--lang) capped at T, 2T, 4T tokens.
matrix     the LSS matrix over --langs (sources = targets) at F, 2F, 4F facts, each from a cold cache, so the
           unpatched columns are inside the timing too; also without its fixed setup (lm-eval task building).
The exponent b of time = a * work^b is the least-squares slope in log-log; linear scaling is b = 1 (goal
1.0 +- 0.1). A fixed cost per run (setup, lm-eval task building) pulls b below 1 at small sizes: the
script prints each point, so the fixed part can be read off.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_lss import synthetic_neurons
from omegaconf import OmegaConf
from roofline import bench_parser

from lsn_exp import CONF_DIR, data, lss, models
from lsn_exp.cache import CacheStore
from lsn_exp.forkmap import processes_for
from lsn_exp.record import language_stats, prefix_token
from lsn_exp.settings import lss_settings
from lsn_exp.specs import PatchSpec, parse_factor


def exponent(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(seconds) on log(work)."""
    xs, ys = [math.log(w) for w, _ in points], [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def recording_points(handle, lang: str, tokens: int) -> list[tuple[float, float]]:
    sentences = data.flores(data.resolve_root(None), data.languages([lang])[0], "dev").sentences
    prefix = prefix_token(handle.tokenizer, "auto")
    points = []
    for scale in (1, 2, 4):
        start = time.perf_counter()
        language_stats(handle, sentences, tokens * scale, 32, prefix, handle.batch_size, desc=f"record x{scale}")
        points.append((tokens * scale, time.perf_counter() - start))
        print(f"recording {tokens * scale:7d} tokens: {points[-1][1]:7.1f} s")
    return points


def matrix_points(handle, langs: list[str], facts: int) -> list[tuple[float, float, float]]:
    neurons = synthetic_neurons(handle, 0.002)
    spec_for = lambda t: PatchSpec.from_config({"neuron_set": "lape"}, parse_factor("pmax"), t)  # noqa: E731
    points = []
    for scale in (1, 2, 4):
        cfg = lss_settings({"n_facts": facts * scale, "sources": langs, "targets": langs, "bootstrap": 0})
        with tempfile.TemporaryDirectory() as cache:
            store = CacheStore(Path(cache))
            start = time.perf_counter()
            evaluator = lss.LssEvaluator(handle, cfg, None, store)  # lm-eval task building: a fixed cost
            setup = time.perf_counter() - start
            lss.lss_matrix(handle, neurons, spec_for, cfg, None, store, evaluator=evaluator)
            seconds = time.perf_counter() - start
        work = facts * scale * len(langs) * len(langs)  # patched prompts: facts x sources x targets
        points.append((work, seconds, seconds - setup))
        print(f"matrix {facts * scale:4d} facts x {len(langs)} x {len(langs)}: {seconds:7.1f} s "
              f"(setup {setup:.1f} s, scoring {seconds - setup:.1f} s)")
    return points


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--langs", default="en,fr,ja")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    handle = models.load(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    handle.scoring_processes = processes_for("auto", handle.device)  # as a job scores
    print(f"model={args.model} threads={torch.get_num_threads()} scoring processes={handle.scoring_processes}")
    rec = recording_points(handle, args.lang, args.tokens)
    mat = matrix_points(handle, args.langs.split(","), args.facts)
    print(f"exponent: recording time vs tokens {exponent(rec):.2f}; matrix time vs facts x sources x targets "
          f"{exponent([(w, t) for w, t, _ in mat]):.2f}, its scoring alone {exponent([(w, t) for w, _, t in mat]):.2f}"
          "  (goal 1.0 +- 0.1)")


if __name__ == "__main__":
    main()
