"""A default job's wall time per stage against the roofline of the work it did.

    .venv/bin/python -m lsn_exp hydra.run.dir=RUN            # the job (cold: an empty cache; warm: a second run)
    .venv/bin/python benchmarks/bench_job.py RUN [RUN ...]    # right after, on the same machine

For each run it reads ``results.json`` (step_times_s) and counts the job's work again: the tokens recording fed
(all of FLORES-200 dev per language, each sentence after its prefix token, when the job recorded) and the LSS
requests (the unpatched columns {source, target} of every source, when they were not cached, and the
patched run toward ``lang``; benchmarks/roofline.py ScoringWork). It then measures the matmul rates on the
model's shapes and prints each stage's time, its roofline time and the ratio, and the goal figure
``job time / (recording roofline + LSS roofline)`` (goal for a cold job: <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

from omegaconf import OmegaConf
from roofline import ScoringWork, body_flops_per_token, matmul_gflops

from lsn_exp import data, lss, models
from lsn_exp.record import prefix_token, tokenize
from lsn_exp.settings import lss_settings


def recording_work(handle, cfg) -> tuple[int, float]:
    """(fed tokens, mean causal context) of recording every identify language's FLORES split."""
    prefix = prefix_token(handle.tokenizer, cfg["identify"]["prefix"])
    lengths = []
    for lang in data.languages(list(cfg["identify"]["languages"])):
        sentences = data.flores(data.resolve_root(cfg["data"]["root"]), lang, cfg["identify"]["split"]).sentences
        lengths += [len(row) for row in tokenize(handle.tokenizer, sentences, prefix)]
    return sum(lengths), statistics.mean(lengths) / 2


def lss_work(handle, cfg, cold: bool) -> ScoringWork:
    """The LSS requests of a job toward cfg.lang: the patched run, plus the unpatched columns when cold."""
    evaluator = lss.LssEvaluator(handle, lss_settings(cfg["lss"]), cfg["data"]["root"], None)
    target = cfg["lang"]["code"]
    _, _, patched = evaluator._requests_toward(target)
    work = ScoringWork.of(evaluator.lm, [inst.args for inst in patched])
    if cold:  # a run of its own before the patched one
        t = data.LSS_LANGS.index(target)
        columns = [row[i].args for source, grid in evaluator.requests.instances.items() for row in grid
                   for i in {data.LSS_LANGS.index(source), t}]
        work = ScoringWork.of(evaluator.lm, columns) + work
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run dirs of default jobs (results.json)")
    parser.add_argument("--probes", type=int, default=20, help="matmul probes (their median is the rate)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = [json.loads((run / "results.json").read_text()) for run in args.runs]
    handle = models.load(OmegaConf.create(records[0]["config"]["model"]))
    probes = sorted(matmul_gflops(handle.model, 512, repeats=1) for _ in range(args.probes))
    gflops = statistics.median(probes)
    print(f"matmul on the body's shapes (512 rows), {args.probes} probes: median {gflops:.1f} GFLOP/s (range "
          f"{probes[0]:.1f}-{probes[-1]:.1f}); the job ran before them, and a shared box drifts over minutes")
    for run, record in zip(args.runs, records):
        cfg, results = record["config"], record["results"]
        steps = results["step_times_s"]
        recorded = bool(results["identify"].get("recorded"))
        cold_lss = not all(results["lss"].get("unpatched_cached", {}).values())
        tokens, context = recording_work(handle, cfg) if recorded else (0, 0.0)
        record_roof = tokens * body_flops_per_token(handle.model, context) / gflops / 1e9
        work = lss_work(handle, cfg, cold_lss)
        lss_roof, figures = work.roofline_seconds(handle.model)
        total = results["wall_time_s"]
        print(f"{run}: {'cold' if recorded else 'warm'} job, {total:.1f} s; " +
              " ".join(f"{name} {sec:.1f}s" for name, sec in steps.items()))
        if recorded:
            print(f"  identify_neurons {steps['identify_neurons']:.1f} s vs recording roofline {record_roof:.1f} s "
                  f"({tokens} tokens) -> {record_roof / steps['identify_neurons']:.3f}")
        columns = "in" if cold_lss else "cached"
        print(f"  lss_scores {steps['lss_scores']:.1f} s vs LSS roofline {lss_roof:.1f} s ({work.fed_tokens} fed "
              f"tokens, {work.scored_positions} scored positions; unpatched columns {columns}) -> "
              f"{lss_roof / steps['lss_scores']:.3f}")
        print(f"  job / (recording roofline + LSS roofline) = {total / (record_roof + lss_roof):.2f}  "
              f"(goal for a cold job <= 1.3)")


if __name__ == "__main__":
    main()
