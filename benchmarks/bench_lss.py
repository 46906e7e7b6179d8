"""Full 15x15 LSS matrix on Gemma-3-270M: our batched, baseline-once path vs the paper-style loop.

    python benchmarks/bench_lss.py [--n-facts 8] [--factor pmax] [--threads 1] [--model gemma3_270m]

ours   LssEvaluator + lss_matrix: lm-eval loglikelihood requests through LsnHFLM (batch size --batch-size),
       each prompt run once with its objects read from the KV cache, the unpatched scores once for all
       targets, then one batched call per target under the patch. "cold": the baseline is computed inside
       the timing; "warm": it comes from the cache, as it does for every later job, target and
       factor of the same model and sample. "warm, whole rows": the same with prompt sharing off (one row
       per request, as HFLM batches them), to show what the KV-cache sharing alone brings.
paper  for every target, every source s != t and every fact: 4 forward passes at batch size 1 (unpatched
       obj_s and obj_t, then patched obj_s and obj_t), full logits, the baseline rescored for each target.
Both score the same facts and continuations; the run prints both times, the ratio, and how far the two
matrices agree (they may differ only on facts whose shift lies within the tolerance of the threshold).
The neuron sets are synthetic by default (random, LAPE-sized: timing does not depend on which neurons).

roofline  the patched run toward --roofline-target (every source, as a default job scores it) against the
       matmul roofline measured in the same run: body FLOPs of every fed token plus LM-head FLOPs of every
       scored position (benchmarks/roofline.py ScoringWork), divided by the matmul rates on those shapes.
       --only-roofline skips the matrix and the paper loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from roofline import ScoringWork

from lsn_exp import CONF_DIR, data, lss, models
from lsn_exp.cache import CacheStore
from lsn_exp.forkmap import processes_for
from lsn_exp.neuronset import NeuronSet
from lsn_exp.patch import Patch
from lsn_exp.settings import lss_settings
from lsn_exp.specs import PatchSpec, parse_factor


def synthetic_neurons(handle, per_lang: float, seed: int = 0) -> NeuronSet:
    gen = torch.Generator().manual_seed(seed)
    shape = (len(data.LSS_LANGS), handle.adapter.n_layers, handle.adapter.d_ff)
    masks = {name: torch.rand(shape, generator=gen) < per_lang for name in ("lape", "baseline", "random")}
    p_max = torch.rand(shape, generator=gen) + 0.5
    return NeuronSet(list(data.LSS_LANGS), masks, p_max, p_max / 3, torch.rand(shape, generator=gen),
                          meta={"synthetic": True})


@torch.inference_mode()
def logprob_bs1(handle, prompt: str, continuation: str) -> float:
    """One unbatched forward, full logits: log P(continuation | prompt) with lm-eval's token split."""
    ctx = handle.tokenizer.encode(prompt)
    whole = handle.tokenizer.encode(prompt + continuation)
    cont = torch.tensor(whole[len(ctx):])
    logits = handle.model(torch.tensor([whole[:-1]], device=handle.device)).logits[0, len(ctx) - 1:]
    return logits.float().log_softmax(-1).gather(1, cont[:, None].to(logits.device)).sum().item()


def paper_loop(handle, neurons, spec_for, facts, langs, tol: float) -> tuple[dict, dict]:
    """LSS(s→t) per cell and the per-fact shifts, the straightforward way: per target, the baseline pass
    over every (source, fact), then the same pass under the patch."""
    matrix, shifts = {}, {}
    for target in langs:
        pairs = [(source, fact) for source in langs if source != target for fact in facts
                 if fact.continuation(source, source) != fact.continuation(source, target)]

        def deltas():
            return [logprob_bs1(handle, fact.prompts[source], fact.continuation(source, target))
                    - logprob_bs1(handle, fact.prompts[source], fact.continuation(source, source))
                    for source, fact in pairs]

        base = deltas()
        with Patch(handle, neurons, spec_for(target)):
            after = deltas()
        for source in (s for s in langs if s != target):
            rows = np.asarray([a - b for (s, _), a, b in zip(pairs, after, base) if s == source])
            shifts[(source, target)] = rows
            matrix[(source, target)] = float(np.mean(rows > tol)) if rows.size else float("nan")
    return matrix, shifts


def roofline_run(handle, neurons, spec, cfg, store, processes_list=(1, 2)) -> None:
    """One patched run toward spec.target from every source (unpatched columns cached first), and its share of
    the roofline."""
    evaluator = lss.LssEvaluator(handle, cfg, None, store)
    evaluator.unpatched.ensure([spec.target])
    _, _, scored = evaluator._requests_toward(spec.target)
    work = ScoringWork.of(evaluator.lm, [inst.args for inst in scored])
    seconds, cells, fed = {}, {}, []
    hook = handle.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].numel()),
                                                  with_kwargs=True)  # positions fed, padding included
    for processes in processes_list:
        evaluator.lm.scoring_processes = processes
        result = evaluator.score(neurons, spec)
        seconds[processes], cells[processes] = result.wall_time_s, result.cells
        hook.remove()  # counted on the one-process run only (a forked worker's calls are not seen here)
    roof_s, figures = work.roofline_seconds(handle.model)
    print(f"roofline: patched run toward {spec.target}: {len(scored)} requests, {work.contexts} prompts, "
          f"{work.fed_tokens} fed tokens, {work.scored_positions} scored positions; padding "
          f"{1 - work.fed_tokens / sum(fed):.1%} of fed positions (batches sorted by length)")
    print(f"roofline: body {figures['body_gflop']:.0f} GFLOP at {figures['body_gflops']:.1f} GFLOP/s + head "
          f"{figures['head_gflop']:.0f} GFLOP at {figures['head_gflops']:.1f} GFLOP/s = {roof_s:.1f} s")
    for processes, wall in seconds.items():
        print(f"roofline: {processes} scoring process(es): {wall:.1f} s ({work.fed_tokens / wall:.1f} fed tokens/s); "
              f"LSS scoring / roofline: {roof_s / wall:.3f}  (goal >= 0.6)")
    if len(cells) > 1:
        print(f"roofline: cells equal across process counts: {len({repr(c) for c in cells.values()}) == 1}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_270m", help="conf/model/<name>.yaml")
    parser.add_argument("--n-facts", type=int, default=8)
    parser.add_argument("--factor", default="pmax", help="a number (multiply) or pmax | pmedian")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--langs", default="all", help="all (the full 15x15 matrix) or e.g. en,fr,ja")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--neurons-per-lang", type=float, default=0.002, help="synthetic set size per layer")
    parser.add_argument("--roofline-target", default="id", help="the target of the roofline measurement")
    parser.add_argument("--only-roofline", action="store_true", help="skip the matrix and the paper loop")
    parser.add_argument("--processes", default="auto", help="scoring processes of the matrix runs (auto: the default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    handle = models.load(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    neurons = synthetic_neurons(handle, args.neurons_per_lang)
    factor = parse_factor(args.factor)
    spec_for = lambda t: PatchSpec.from_config({"neuron_set": "lape"}, factor, t)  # noqa: E731
    cfg = {"n_facts": args.n_facts, "sources": args.langs, "targets": args.langs, "batch_size": args.batch_size,
           "bootstrap": 0}
    cfg = lss_settings(cfg)
    langs = list(cfg.sources)
    print(f"model={args.model} device={handle.device} dtype={handle.model.dtype} threads={torch.get_num_threads()} "
          f"facts={args.n_facts} langs={len(langs)} factor={factor} batch_size={args.batch_size}")

    with tempfile.TemporaryDirectory() as cache:
        store = CacheStore(Path(cache))
        roofline_run(handle, neurons, spec_for(args.roofline_target), cfg, store)
        handle.scoring_processes = processes_for(args.processes, handle.device)
        if args.only_roofline:
            return
        start = time.perf_counter()
        evaluator = lss.LssEvaluator(handle, cfg, None, store)
        evaluator.unpatched.ensure(langs)  # every column, cold cache
        baseline_s = time.perf_counter() - start
        result = lss.lss_matrix(handle, neurons, spec_for, cfg, None, store, evaluator=evaluator)
        ours_s = time.perf_counter() - start
        print(f"ours (cold): {ours_s:8.1f} s  (setup + baseline {baseline_s:.1f} s, {len(langs)} patched runs "
              f"{result.patched_wall_time_s:.1f} s)  mean off-diagonal LSS {result.mean_offdiag:.3f}")
        start = time.perf_counter()
        warm = lss.lss_matrix(handle, neurons, spec_for, cfg, None, store)  # baseline from the cache
        warm_s = time.perf_counter() - start
        assert all(warm.unpatched_cached.values())
        print(f"ours (warm): {warm_s:8.1f} s  (baseline loaded from the cache, as for every later target/factor)")
        whole = lss.LssEvaluator(handle, cfg, None, store)
        whole.lm.share_prompts = False
        start = time.perf_counter()
        rows = lss.lss_matrix(handle, neurons, spec_for, cfg, None, store, evaluator=whole)
        whole_s = time.perf_counter() - start
        same = sum(a.lss == b.lss or (a.n == 0 and b.n == 0) for a, b in zip(rows.cells, warm.cells))
        print(f"ours (warm, whole rows): {whole_s:8.1f} s  (no KV-cache sharing; {same}/{len(rows.cells)} cells "
              f"equal to the shared path) -> sharing {whole_s / warm_s:.2f}x")

    facts = data.sample_facts(data.read_mlama(data.mlama_root(None)).facts, args.n_facts, 0)
    start = time.perf_counter()
    paper, paper_shifts = paper_loop(handle, neurons, spec_for, facts, langs, evaluator.settings.tol)
    paper_s = time.perf_counter() - start
    paper_mean = float(np.nanmean(list(paper.values())))
    print(f"paper      : {paper_s:8.1f} s  (batch size 1, baseline rescored per target)  mean off-diagonal LSS "
          f"{paper_mean:.3f}")

    differ = [(c.source, c.target) for c in result.cells if c.lss != paper[(c.source, c.target)]
              and not (c.n == 0 and np.isnan(paper[(c.source, c.target)]))]
    gap = max(abs(c.mean_shift - float(paper_shifts[(c.source, c.target)].mean())) for c in result.cells if c.n > 0)
    print(f"agreement: {len(differ)} of {len(paper)} cells differ {differ[:5]}; max |mean shift(ours) - "
          f"mean shift(paper)| = {gap:.2e} nats (tol {evaluator.settings.tol:g})")
    print(f"ratio paper/ours: {paper_s / ours_s:.1f}x cold, {paper_s / warm_s:.1f}x with the cached baseline")


if __name__ == "__main__":
    main()
