"""The device check: both offline models in bf16 on one GPU, end to end, in one script (about 5-8 min on an H100/H200).

    .venv/bin/python scripts/gpu_check.py [--out PATH] [--models gemma3_270m,smollm2_135m]
    .venv/bin/python scripts/gpu_check.py --device cpu --quick [--models tiny]    # the same code paths, small

Per model, each stage guarded (a failure is a row of the table and the next stage runs):
  identify  the job's load_model and identify_neurons steps (composed config, model.dtype=bfloat16, all 18
            languages at identify.max_tokens per language, a fresh cache): tokens/s, LAPE set size
  no-ops    every patch kind of lsn_exp.noops in its no-op form, LSS shifts over --n-facts facts from every source
            toward each of --targets, on the LAPE sets widened by --noop-share of each layer at random: "any" kinds
            on those neurons live, the others on them made dead (noops.dead_neurons); every shift must be exactly
            0 in 16-bit (max |shift|, wins, and how many neurons and hooked / edited layers the patch touched)
  roofline  plain forward and recording of FLORES en against the matmul rate on the model's own shapes
            (benchmarks/roofline.py, bench_record.py), and the patched LSS run toward the first target
  compare   +experiment=compare_methods toward the first target at small sizes, in-process (lsn_exp.compare)
Stages run stage by stage over the models (both models' no-ops come before either's roofline); a stage that would
start after --budget-s is skipped and said so. Prints one markdown table and writes it as JSON to --out (default
$OUT/gpu_check.json when OUT is set, else ./gpu_check.json) and as markdown beside it. Exit 1 when a no-op moved
a score (or the no-op stage did not finish), 2 when another stage failed, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import checklib  # scripts/ is on sys.path when this file runs
import numpy as np
import torch

from lsn_exp import compare, data, lmeval, lss, noops
from lsn_exp.cache import CacheStore
from lsn_exp.record import ActivationRecorder, Batch, make_batches, prefix_token, tokenize
from lsn_exp.settings import lss_settings
from lsn_exp.specs import PatchSpec
from lsn_exp.steer import intervene

FULL = {"languages": "all", "max_tokens": 20000, "n_facts": 20, "targets": "id,ja,th", "sources": "all",
        "sentences": 256, "repeats": 3,
        "compare": ["compare.lss_n_facts=20", "compare.n_prompts=16", "compare.search.n_evals=3",
                    "compare.search.n_prompts=4", "compare.final.n_prompts=8", "compare.xcopa_limit=10"]}
QUICK = {"languages": "en,id,fr,ja,ru,zh", "max_tokens": 300, "n_facts": 3, "targets": "id", "sources": "en,fr,ja",
         "sentences": 16, "repeats": 1,  # 300 tokens: every first sentence of these languages fits (SmolLM2 th: 509)
         "compare": ["compare.lss_n_facts=2", "compare.n_prompts=2", "compare.search.n_evals=2",
                     "compare.search.n_prompts=1", "compare.final.n_prompts=1", "compare.xcopa_limit=0",
                     "compare.domains=[news]", "generate.max_new_tokens=3", "lss.sources=[en,fr]"]}


def base_overrides(model: str, args) -> list[str]:
    extra = [f"data.root={args.data_root}"] if args.data_root else []
    extra += [] if args.languages == "all" else [f"identify.languages=[{args.languages}]"]
    return [f"model={model}", f"model.dtype={args.dtype}", f"model.device={args.device}", f"cache_dir={args.cache}",
            f"identify.max_tokens={args.max_tokens}", *extra]


def identify_stage(model: str, args):
    start = time.time()
    cfg = checklib.composed(*base_overrides(model, args), "stage=identify")
    ctx = checklib.load_job(cfg, args.work / model / "identify")
    loaded = time.time() - start
    found = checklib.identify_timed(ctx)
    handle = ctx.model_handle
    dtype = str(handle.model.dtype).replace("torch.", "")
    rows = [("model, dtype, device", f"{handle.identity.get('id', model)}, {dtype}, {handle.device}",
             dtype == args.dtype),
            ("model load s", round(loaded, 1), None),
            (f"identify: tokens ({found['languages']} languages, cap {args.max_tokens} each)", found["tokens"],
             found["tokens"] > 0),
            ("identify: seconds / tokens per s", f"{found['seconds']} s / {found['tokens_per_s']:.0f}", None),
            ("LAPE neurons: distinct / summed over languages", f"{found['lape_distinct']} / {found['lape_summed']}",
             None)]
    return rows, ctx


def widened(neurons, share: float, seed: int = 0):
    """``neurons`` with every language's LAPE set widened by a random ``share`` of each layer's neurons (a no-op
    must stay exact however many neurons its hooks touch; a 300-token LAPE set may have none for a target)."""
    gen = torch.Generator().manual_seed(seed)
    lape = neurons.masks["lape"] | (torch.rand(neurons.masks["lape"].shape, generator=gen) < share)
    return dataclasses.replace(neurons, masks={**neurons.masks, "lape": lape})


def noop_stage(ctx, args):
    handle, neurons = ctx.model_handle, widened(ctx.neurons, args.noop_share)
    lss_cfg = lss_settings({"n_facts": args.n_facts, "sources": args.sources, "targets": args.targets, "bootstrap": 0})
    stores = {name: CacheStore(args.cache / "noops" / ctx.settings.model.name / name) for name in ("real", "dead")}
    real, dead = (lss.LssEvaluator(handle, lss_cfg, ctx.data_root, stores[n]) for n in ("real", "dead"))
    kinds = noops.kinds(relu=handle.adapter.activation == "relu")
    rows = [("no-op layout; neurons", f"{'paired (16-bit)' if real.paired_layout() else 'cached columns (fp32)'}; "
             f"LAPE + {args.noop_share:.0%} of each layer at random, live or dead", None)]
    found = {}  # kind -> (max |shift|, wins, scored facts, what the patch installed)
    for kind in (k for k in kinds if k.needs == noops.ANY):
        found[kind.name] = noop_shifts(real, neurons, kind)
    with noops.dead_neurons(handle, neurons.masks["lape"], neurons.languages) as dead_artifact:
        for kind in (k for k in kinds if k.needs != noops.ANY):
            found[kind.name] = noop_shifts(dead, dead_artifact, kind)
    exact = real.paired_layout()
    for kind in kinds:
        top, wins, n, summary = found[kind.name]
        where = "live" if kind.needs == noops.ANY else "dead"
        rows.append((f"no-op {kind.name} ({where})", f"max |shift| {top:.3g}, wins {wins} of {n}; {summary}",
                     top == 0 if exact else wins == 0))
    return rows, found


def noop_shifts(evaluator, neurons, kind) -> tuple[float, int, int, str]:
    """(max |shift|, wins, scored facts, what the patch installed) of ``kind`` toward every target."""
    top, wins, n, summary = 0.0, 0, 0, ""
    for target in evaluator.settings.targets:
        try:
            shifts, patch, _, _ = evaluator.deltas(neurons, kind.build(target))
        except Exception as exc:  # this kind fails alone: the others are still scored
            traceback.print_exc()
            return float("nan"), wins, n, f"toward {target}: {type(exc).__name__}: {exc}"[:300]
        for shift in shifts.values():
            scored = shift[~np.isnan(shift)]
            if scored.size:
                top = max(top, float(abs(scored).max()))
            wins += int((scored > evaluator.settings.tol).sum())
            n += int(scored.size)
        summary = f"{patch.neurons} neurons, {patch.hook_layers} hook / {patch.weight_edit_layers} edited layers"
    return top, wins, n, summary


def recording_batches(handle, sentences: list[str], n_stat: int) -> tuple[list, list, list[list[int]]]:
    """The recording batches of ``sentences`` as a job makes them (on the host), the same on the model's device,
    and the token ids (prefix first)."""
    ids = tokenize(handle.tokenizer, sentences, prefix_token(handle.tokenizer, "auto"))
    batches = make_batches(ids, 1, n_stat, handle.batch_size, handle.tokenizer.pad_token_id)
    moved = [Batch(*(t.to(handle.device) for t in (b.input_ids, b.attention_mask, b.count_mask, b.stat_rows)))
             for b in batches]
    return batches, moved, ids


def roofline_stage(ctx, args):
    from bench_record import plain_forward
    from roofline import body_flops_per_token, matmul_gflops

    handle = ctx.model_handle
    sentences = data.flores(ctx.data_root, data.languages(["en"])[0], "dev").sentences[: args.sentences]
    n_stat = min(32, len(sentences))
    batches, on_device, ids = recording_batches(handle, sentences, n_stat)
    tokens = sum(len(row) - 1 for row in ids)  # counted: the prefix left out
    runs = {"forward": lambda: plain_forward(handle, on_device),  # the decoder alone, no LM head, no copies
            "record": lambda: ActivationRecorder(handle, n_stat).run(batches, "record")}  # as a job records
    timings = {name: [] for name in runs}
    plain_forward(handle, on_device[:1])  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():  # alternating, so both see the same machine state
            checklib.synchronize(handle.device)
            start = time.perf_counter()
            fn()
            checklib.synchronize(handle.device)
            timings[name].append(time.perf_counter() - start)
    rows_per_batch = int(sum(b.input_ids.numel() for b in batches) / len(batches))
    gflops = matmul_gflops(handle.model, rows_per_batch, args.repeats)
    per_token = body_flops_per_token(handle.model, statistics.mean(len(row) for row in ids) / 2)  # mean context
    roof = gflops * 1e9 / per_token  # tokens/s at the matmul rate
    forward, record = (tokens / statistics.median(timings[k]) for k in ("forward", "record"))
    rows = [(f"matmul on the body's shapes ({rows_per_batch} rows)", f"{gflops:.1f} GFLOP/s", None),
            ("forward / roofline (tokens/s)", f"{forward / roof:.3f} ({forward:.0f} of {roof:.0f})", None),
            ("recording / roofline", f"{record / roof:.3f} (recording / forward {record / forward:.3f})", None)]
    rows.append(lss_roofline(ctx, args))
    return rows, {"gflops": gflops, "forward_ratio": forward / roof, "record_ratio": record / roof}


def lss_roofline(ctx, args) -> tuple:
    """The patched LSS run (pmax) toward the first target against its roofline (ScoringWork)."""
    from roofline import ScoringWork

    handle, target = ctx.model_handle, args.targets[0]
    sample = lss_settings({"n_facts": args.n_facts, "sources": args.sources, "bootstrap": 0})
    evaluator = lss.LssEvaluator(handle, sample,
                                 ctx.data_root, None)
    _, _, scored = evaluator._requests_toward(target)
    work = ScoringWork.of(evaluator.lm, [inst.args for inst in scored])
    spec = PatchSpec(target, op="set", source="pmax")
    with intervene(handle, ctx.neurons, spec):
        lmeval.loglikelihoods(evaluator.lm, scored[: min(64, len(scored))])  # warm-up
        checklib.synchronize(handle.device)
        start = time.perf_counter()
        lmeval.loglikelihoods(evaluator.lm, scored)
        checklib.synchronize(handle.device)
        seconds = time.perf_counter() - start
    roof_s, _ = work.roofline_seconds(handle.model)
    return (f"LSS patched run toward {target} / roofline", f"{roof_s / seconds:.3f} ({len(scored)} requests, "
            f"{work.fed_tokens} fed tokens in {seconds:.2f} s)", None)


def compare_stage(ctx, args):
    target = args.targets[0]
    sizes = QUICK["compare"] if args.quick else FULL["compare"]
    cfg = checklib.composed(*base_overrides(ctx.settings.model.name, args), "+experiment=compare_methods",
                            f"compare.targets=[{target}]", *sizes)
    start = time.time()
    found, _, tests = compare.compare(cfg, ctx.model_handle, ctx.neurons, ctx.data_root, ctx.store, ctx.neurons_key)
    rows = []
    for row in found:
        lo, hi = row["steering_success_ci"] or (float("nan"), float("nan"))
        lss_text = "—" if row["lss"] is None else f"{row['lss']:.3f}"
        rows.append((f"{row['method']} -> {target} ({row['domain']})",
                     f"LSS {lss_text}; success {row['steering_success']:.2f} [{lo:.2f}, {hi:.2f}] n={row['n']}; "
                     f"ppl {row['ppl'] or float('nan'):.1f}", None))
    methods = len(cfg.compare.methods) + 1
    rows.append(("rows (methods x domains) / paired tests",
                 f"{len(found)} / {len(tests)} in {time.time() - start:.0f} s",
                 len(found) == methods * len(cfg.compare.domains)))
    return rows, found


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma3_270m,smollm2_135m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run of the same paths)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="run dirs and the fresh cache (default: beside "
                        "--out; under /tmp when --out is in $OUT, which brings back only a few files)")
    parser.add_argument("--data-root", default=None, help="data.root (default: LSN_DATA or ../shared/data)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no stage starts after this many seconds")
    parser.add_argument("--noop-share", type=float, default=0.01, help="random neurons added to each LAPE set "
                        "for the no-ops")
    for key in ("languages", "max_tokens", "n_facts", "targets", "sources", "sentences", "repeats"):
        parser.add_argument(f"--{key.replace('_', '-')}", default=None)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key in ("max_tokens", "n_facts", "sentences", "repeats"):
        setattr(args, key, int(getattr(args, key) or sizes[key]))
    args.languages = args.languages or sizes["languages"]
    args.targets = (args.targets or sizes["targets"]).split(",")
    args.sources = args.sources or sizes["sources"]
    args.sources = "all" if args.sources == "all" else args.sources.split(",")
    out_env = os.environ.get("OUT")
    args.out = args.out or (Path(out_env) / "gpu_check.json" if out_env else Path("gpu_check.json"))
    if args.work is None:
        in_out = out_env and args.out.resolve().parent == Path(out_env).resolve()
        args.work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if in_out else args.out.parent / "gpu_check_work"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    args.cache = checklib.fresh_cache(args.work)
    info = checklib.machine(args.device)
    print(json.dumps(info), flush=True)
    report, contexts, results = checklib.Report(args.budget_s), {}, {}
    models = args.models.split(",")
    for model in models:
        contexts[model] = report.stage(model, "identify", lambda m=model: identify_stage(m, args))
    for name, fn in (("no-ops", noop_stage), ("roofline", roofline_stage), ("compare", compare_stage)):
        for model in (m for m in models if contexts[m] is not None):
            results[(model, name)] = report.stage(model, name, lambda m=model, f=fn: f(contexts[m], args))
    head = (f"{info.get('card', info['cpu'])}; torch {info['torch']}, CUDA {info['cuda']}; {args.dtype} on "
            f"{args.device}; {'quick' if args.quick else 'full'} sizes; {time.time() - report.started:.0f} s")
    text = f"{head}\n\n{report.markdown()}"
    print(f"\n{text}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    found = {f"{model}/{stage}": result for (model, stage), result in results.items()}
    args.out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": report.rows, "results": found,
                                    "seconds": round(time.time() - report.started, 1)}, indent=2, default=str))
    args.out.with_suffix(".md").write_text(text + "\n")
    noop_done = all(results.get((m, "no-ops")) is not None for m in models)
    if report.failed("no-ops") or not noop_done:
        return 1
    return 2 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
