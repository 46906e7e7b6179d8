"""bf16 against fp32 on the CPU, end to end and side by side, on the offline models.

    .venv/bin/python scripts/bf16_table.py [--models gemma3_270m,smollm2_135m] [--max-tokens 20000] [--targets id,ja]
        [--n-facts 185] [--n-prompts 16] [--out bf16_table.md]
    .venv/bin/python scripts/bf16_table.py --quick    # smoke run: 3 languages at 150 tokens, 2 facts, 1 prompt

Per model, each dtype runs the job's own steps (a composed config with model.dtype=float32 | bfloat16 on the CPU,
one fresh cache, so nothing recorded before is reused):
- identification of all 18 languages at --max-tokens per language; the two dtypes alternate in chunks of --chunk
  languages (each chunk's build records only its new languages), so both see the same machine state;
- the Jaccard overlap of each language's LAPE set, bf16 against fp32;
- LSS toward each of --targets under each dtype's own LAPE pmax patch: the mean over every source on --n-facts
  facts, with a 95% CI that resamples the facts the cells share (metrics.fact_bootstrap), and bf16 - fp32;
- steering success of the same patch on the reported FLORES devtest openings (generate.steering: sources en, fr,
  ja, --n-prompts each, the target's own prompts left out) with 95% Wilson intervals (metrics.share_interval);
- speed, fp32 seconds / bf16 seconds, of identification, of LSS (unpatched scores included: fp32's cached columns,
  bf16's run in the patched run's layout) and of generation, each pair timed alternately in the same run.
Prints one markdown table, headed by the CPU's name and its bf16 flags, and writes it to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import checklib  # scripts/ is on sys.path when this file runs
import numpy as np

from lsn_exp import generate, identify, job, lss
from lsn_exp.engine import engine_of
from lsn_exp.prompts import prompt_split
from lsn_exp.settings import lss_settings
from lsn_exp.specs import PatchSpec, parse_factor
from lsn_exp.steer import intervene

DTYPES = ("float32", "bfloat16")
FULL = {"languages": "all", "max_tokens": 20000, "n_facts": 185, "targets": "id,ja", "sources": "all",
        "n_prompts": 16, "max_new_tokens": 25, "chunk": 6}
QUICK = {"languages": "en,id,fr", "max_tokens": 150, "n_facts": 2, "targets": "id", "sources": "en,fr",
         "n_prompts": 1, "max_new_tokens": 4, "chunk": 2}  # 150 tokens: the first en, id, fr sentence fits (SmolLM2)


def contexts(model: str, args) -> dict:
    """dtype -> the job's context after load_model (fp32 and bf16 of ``model`` on the CPU, one cache)."""
    found = {}
    for dtype in DTYPES:
        overrides = [f"model={model}", f"model.dtype={dtype}", "model.device=cpu", f"cache_dir={args.cache}",
                     f"identify.max_tokens={args.max_tokens}", "factor=pmax",
                     f"generate.n_prompts={args.n_prompts}", f"generate.max_new_tokens={args.max_new_tokens}"]
        if args.languages != "all":
            overrides.append(f"identify.languages=[{args.languages}]")
        found[dtype] = checklib.load_job(checklib.composed(*overrides), args.work / model / dtype)
        engine_of(found[dtype].model_handle).generate(["The market"], 2)  # warm-up: first calls pay setup
    return found


def identify_side_by_side(ctxs: dict, args) -> dict:
    """dtype -> identification seconds; each context gets its neuron set through the job's identify step."""
    langs = list(ctxs[DTYPES[0]].settings.identify.languages)
    seconds = dict.fromkeys(ctxs, 0.0)
    for stop in range(max(args.chunk, 2), len(langs) + args.chunk, args.chunk):
        for dtype, ctx in ctxs.items():
            chunk = replace(ctx.settings.identify, languages=tuple(langs[:stop]))
            start = time.perf_counter()
            identify.build(chunk, ctx.model_handle, ctx.data_root, ctx.store, seed=ctx.settings.seed)
            seconds[dtype] += time.perf_counter() - start
    for dtype, ctx in ctxs.items():
        start = time.perf_counter()
        job.identify_neurons(ctx)  # every recording and the selection are cached by now
        seconds[dtype] += time.perf_counter() - start
    return seconds


def jaccard(a, b) -> list[float]:
    """Per language: |A ∩ B| / |A ∪ B| of two bool [K, L, d_ff] LAPE masks (1 when both are empty)."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return [1.0 if u == 0 else float(i / u) for i, u in zip(inter, union)]


def spec_for(ctx, target: str) -> PatchSpec:
    return PatchSpec.from_config(ctx.settings.config["patch"], parse_factor("pmax"), target)


def lss_side_by_side(ctxs: dict, args) -> tuple[dict, dict]:
    """(dtype -> {target | "all": lss_mean}, dtype -> seconds): each target scored by both dtypes in turn."""
    cfg = lss_settings({"n_facts": args.n_facts, "sources": args.sources, "targets": args.targets, "bootstrap": 0})
    evaluators = {d: lss.LssEvaluator(c.model_handle, cfg, c.data_root, c.store) for d, c in ctxs.items()}
    cells, seconds = {d: {} for d in ctxs}, dict.fromkeys(ctxs, 0.0)
    for target in args.targets:
        for dtype, ctx in ctxs.items():
            start = time.perf_counter()
            cells[dtype][target] = evaluators[dtype].score(ctx.neurons, spec_for(ctx, target)).cells
            seconds[dtype] += time.perf_counter() - start
    means = {d: {t: checklib.lss_mean(c) for t, c in by.items()} for d, by in cells.items()}
    for dtype, by in cells.items():
        means[dtype]["all"] = checklib.lss_mean([c for found in by.values() for c in found])
    return means, seconds


def steering_side_by_side(ctxs: dict, args) -> tuple[dict, dict]:
    """(dtype -> {target | "unpatched <target>": measures}, dtype -> seconds) on the reported news prompts."""
    found, seconds = {d: {} for d in ctxs}, dict.fromkeys(ctxs, 0.0)
    unpatched = {d: {} for d in ctxs}  # the unpatched continuations, generated once per dtype
    for target in args.targets:
        for dtype, ctx in ctxs.items():
            settings = ctx.settings.generate
            prompts = prompt_split(settings, ctx.data_root).report
            start = time.perf_counter()
            summary, _ = generate.steering(ctx.model_handle, prompts, target, settings,
                                           intervene(ctx.model_handle, ctx.neurons, spec_for(ctx, target)), "",
                                           unpatched[dtype], None)
            seconds[dtype] += time.perf_counter() - start
            found[dtype][target] = summary["all"]["patched"]
            found[dtype][f"unpatched {target}"] = summary["all"]["unpatched"]
    return found, seconds


def with_ci(value: float, ci, digits: int = 3) -> str:
    lo, hi = ci
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def share(measures: dict) -> str:
    return f"{with_ci(measures['steering_success'], measures['steering_success_ci'], 2)} n={measures['n']}"


def model_rows(model: str, args) -> list[list]:
    """The table's rows for one model (every measure, fp32 | bf16 | difference or speed-up)."""
    ctxs = contexts(model, args)
    id_s = identify_side_by_side(ctxs, args)
    art = {d: ctxs[d].neurons for d in DTYPES}
    tokens = {d: int(sum(art[d].meta.get("tokens", []))) for d in DTYPES}
    sizes = {d: "{} / {}".format(*checklib.lape_size(art[d])) for d in DTYPES}
    overlap = jaccard(art["float32"].masks["lape"], art["bfloat16"].masks["lape"])
    per_lang = " ".join(f"{code} {v:.2f}" for code, v in zip(art["float32"].languages, overlap))
    lss_means, lss_s = lss_side_by_side(ctxs, args)
    steer, gen_s = steering_side_by_side(ctxs, args)
    n = len(art["float32"].languages)
    rows = [[model, f"identification: tokens ({n} languages, cap {args.max_tokens} each)", tokens["float32"],
             tokens["bfloat16"], ""],
            [model, "identification: seconds (tokens/s); speed-up fp32 s / bf16 s",
             *(f"{id_s[d]:.0f} s ({tokens[d] / id_s[d]:.0f})" for d in DTYPES),
             f"{id_s['float32'] / id_s['bfloat16']:.2f}x"],
            [model, "LAPE neurons: distinct / summed", sizes["float32"], sizes["bfloat16"], ""],
            [model, "LAPE Jaccard bf16 vs fp32 per language", "", "", f"mean {np.mean(overlap):.3f}: {per_lang}"]]
    for target in [*args.targets, "all"] if len(args.targets) > 1 else args.targets:
        a, b = (lss_means[d][target] for d in DTYPES)
        what = f"LSS toward {target}" if target != "all" else f"LSS over {', '.join(args.targets)}"
        rows.append([model, f"{what} (pmax; mean over {a['cells']} cells, {args.n_facts} facts; 95% CI over facts)",
                     with_ci(a["lss"], a["lss_ci"]), with_ci(b["lss"], b["lss_ci"]), f"{b['lss'] - a['lss']:+.3f}"])
    rows.append([model, "LSS: seconds; speed-up", *(f"{lss_s[d]:.0f} s" for d in DTYPES),
                 f"{lss_s['float32'] / lss_s['bfloat16']:.2f}x"])
    for target in args.targets:
        for key in (f"unpatched {target}", target):
            a, b = (steer[d][key] for d in DTYPES)
            label = "unpatched" if key.startswith("unpatched") else "pmax"
            rows.append([model, f"steering success toward {target}, {label} (95% Wilson)", share(a), share(b),
                         f"{b['steering_success'] - a['steering_success']:+.2f}"])
    rows.append([model, "generation: seconds; speed-up", *(f"{gen_s[d]:.0f} s" for d in DTYPES),
                 f"{gen_s['float32'] / gen_s['bfloat16']:.2f}x"])
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma3_270m,smollm2_135m")
    parser.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes")
    parser.add_argument("--out", type=Path, default=Path("bf16_table.md"))
    parser.add_argument("--work", type=Path, default=None, help="run dirs and the fresh cache (default: beside --out)")
    for key in FULL:
        parser.add_argument(f"--{key.replace('_', '-')}", default=None)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key in ("max_tokens", "n_facts", "n_prompts", "max_new_tokens", "chunk"):
        setattr(args, key, int(getattr(args, key) or sizes[key]))
    args.languages = args.languages or sizes["languages"]
    args.targets = (args.targets or sizes["targets"]).split(",")
    sources = args.sources or sizes["sources"]
    args.sources = "all" if sources == "all" else sources.split(",")
    args.work = args.work or args.out.parent / "bf16_table_work"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.cache = checklib.fresh_cache(args.work)
    info = checklib.machine("cpu")
    started, rows = time.time(), []
    for model in args.models.split(","):
        try:
            rows += model_rows(model, args)
        except Exception as exc:  # the other model still runs
            traceback.print_exc()
            rows.append([model, "error", f"{type(exc).__name__}: {exc}"[:300], "", ""])
    flags = ", ".join(f"{flag} {'yes' if info[flag] else 'no'}" for flag in ("avx512_bf16", "amx_bf16"))
    head = (f"CPU: {info['cpu']} ({info['cpu_cores']} cores; {flags}); torch {info['torch']}, {info['torch_threads']} "
            f"threads; {'quick' if args.quick else 'full'} sizes; {time.time() - started:.0f} s in all")
    text = head + "\n\n" + checklib.table(["model", "measure", "fp32", "bf16", "bf16 - fp32 / speed-up"], rows)
    print(f"\n{text}")
    args.out.write_text(text + "\n")
    return 1 if any(row[1] == "error" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
