"""The levers tried on recording speed, each measured side by side against today's path in one run.

    .venv/bin/python benchmarks/bench_levers.py [--levers hooks,compile,padding,layout] [--sentences 192]

hooks    the counting hook of ActivationRecorder against the earlier one (a bool mask AND, summed as int64)
compile  torch.compile of the decoder (inductor, dynamic shapes) against eager, plain forward and recording;
         the compile time of the first call is printed apart
padding  the share of fed positions that are padding at several batch sizes: the most that packing sentences
         without padding could save
layout   one process at 2 threads against 2 processes at 1 thread each, each recording half of the sentences
         (the slowest worker's time, model load left out)
lss_layout  the same for LSS scoring: the unpatched columns toward id of every source (--facts facts), in one
         process or split by source over 2 processes
Rounds alternate between the paths compared and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from omegaconf import OmegaConf
from roofline import bench_parser

from lsn_exp import CONF_DIR, data, models
from lsn_exp.record import ActivationRecorder, make_batches, prefix_token, tokenize
from lsn_exp.settings import lss_settings


class EarlierRecorder(ActivationRecorder):
    """The counting hook as it was before this benchmark: ((output > 0) & mask).sum(dim=(0, 1))."""

    def _count(self, layer, output):
        self.counts[layer] += ((output > 0) & self.batch.count_mask.bool()[..., None]).sum(dim=(0, 1))


def setup(args):
    handle = models.load(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    lang = data.languages([args.lang])[0]
    sentences = data.flores(data.resolve_root(None), lang, "dev").sentences[: args.sentences]
    ids = tokenize(handle.tokenizer, sentences, prefix_token(handle.tokenizer, "auto"))
    return handle, ids


def batches_of(handle, ids, batch_size):
    return make_batches(ids, 1, 32, batch_size, handle.tokenizer.pad_token_id)


def timed_rounds(paths: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def forward(decoder, batches):
    with torch.inference_mode():
        for b in batches:
            decoder(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)


def record(handle, batches, recorder_class=ActivationRecorder):
    recorder = recorder_class(handle, 32)
    recorder.run(batches, desc="record")
    return recorder


def lever_hooks(handle, ids, args):
    batches = batches_of(handle, ids, handle.batch_size)
    ours, earlier = record(handle, batches), record(handle, batches, EarlierRecorder)
    assert torch.equal(ours.counts, earlier.counts) and torch.equal(ours.means, earlier.means)
    t = timed_rounds({"forward": lambda: forward(handle.adapter.decoder, batches),
                      "earlier hook": lambda: record(handle, batches, EarlierRecorder),
                      "current hook": lambda: record(handle, batches)}, args.repeats)
    print(f"hooks: recording / forward  earlier {t['forward'] / t['earlier hook']:.3f}  current "
          f"{t['forward'] / t['current hook']:.3f}; current vs earlier {t['earlier hook'] / t['current hook']:.3f}x "
          "(counts and means identical)")


def lever_compile(handle, ids, args):
    batches = batches_of(handle, ids, handle.batch_size)
    eager = handle.adapter.decoder
    compiled = torch.compile(eager, dynamic=True)
    start = time.perf_counter()
    forward(compiled, batches[:2])
    compile_s = time.perf_counter() - start
    t = timed_rounds({"eager": lambda: forward(eager, batches), "compiled": lambda: forward(compiled, batches)},
                     args.repeats)
    print(f"compile: first two batches {compile_s:.1f} s (compilation); forward compiled vs eager "
          f"{t['eager'] / t['compiled']:.3f}x")


def lever_padding(handle, ids, args):
    real = sum(len(row) for row in ids)
    for batch_size in (8, 16, 32, 64):
        fed = sum(b.input_ids.numel() for b in batches_of(handle, ids, batch_size))
        print(f"padding: batch size {batch_size:3d}: {1 - real / fed:.3%} of fed positions are padding")


def lever_layout(handle, ids, args, what: str = "record"):
    cmd = [sys.executable, __file__, "--worker", what, "--model", args.model, "--lang", args.lang,
           "--sentences", str(args.sentences), "--facts", str(args.facts)]

    def run(parts: int, threads: int) -> float:
        start = time.perf_counter()
        procs = [subprocess.Popen(cmd + ["--part", f"{i}/{parts}", "--threads", str(threads)],
                                  stdout=subprocess.PIPE, text=True) for i in range(parts)]
        inner = [json.loads(p.communicate()[0].strip().splitlines()[-1])["seconds"] for p in procs]
        return time.perf_counter() - start, max(inner)

    times = {"1x2": [], "2x1": []}
    for _ in range(args.repeats):
        times["1x2"].append(run(1, 2)[1])
        times["2x1"].append(run(2, 1)[1])
    one, two = (statistics.median(times[k]) for k in ("1x2", "2x1"))
    work = f"recording {sum(len(r) for r in ids)} tokens" if what == "record" else f"LSS columns, {args.facts} facts"
    print(f"{what}_layout: {work}: 1 process x 2 threads {one:.1f} s, 2 processes x 1 thread {two:.1f} s (slowest "
          f"worker, model load excluded) -> {one / two:.3f}x")


def lever_lss_layout(handle, ids, args):
    lever_layout(handle, ids, args, "lss")


def worker(args):
    torch.set_num_threads(args.threads)
    handle, ids = setup(args)
    index, parts = (int(x) for x in args.part.split("/"))
    if args.worker == "lss":
        from lsn_exp import lss

        sources = data.LSS_LANGS[index::parts]
        evaluator = lss.LssEvaluator(handle, lss_settings({"n_facts": args.facts, "bootstrap": 0}), None, None,
                                     sources=sources)
        job = lambda: evaluator.unpatched.ensure(["id"])  # noqa: E731
    else:
        batches = batches_of(handle, ids[index::parts], handle.batch_size)
        forward(handle.adapter.decoder, batches[:1])  # warm-up
        job = lambda: record(handle, batches)  # noqa: E731
    start = time.perf_counter()
    job()
    print(json.dumps({"seconds": time.perf_counter() - start}))


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--sentences", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levers", default="hooks,compile,padding,layout,lss_layout")
    parser.add_argument("--facts", type=int, default=60, help="LSS facts (lss_layout)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    handle, ids = setup(args)
    print(f"model={args.model} lang={args.lang} sentences={len(ids)} tokens={sum(len(r) for r in ids)} "
          f"threads={torch.get_num_threads()}")
    for name in args.levers.split(","):
        globals()[f"lever_{name}"](handle, ids, args)


if __name__ == "__main__":
    main()
