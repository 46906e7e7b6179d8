"""Recording throughput vs a plain forward on the same batches (Gemma-3-270M, real FLORES text).

    .venv/bin/python benchmarks/bench_record.py [--lang en] [--sentences 96] [--repeats 3]

Both paths run the decoder without its LM head on identical batches; the recording path adds the
act_fn hooks (counts + stat-sentence means). Rounds alternate between the two paths and the median
is reported, so load on the machine affects both alike. Goal: ratio >= 0.95.

It also measures the matmul roofline on the model's own layer shapes in the same run (benchmarks/roofline.py)
and reports both paths as a share of it (goal for recording: >= 0.75).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, data, models
from lsn_exp.record import ActivationRecorder, make_batches, prefix_token, tokenize
from roofline import body_flops_per_token, matmul_gflops


def plain_forward(handle, batches) -> None:
    with torch.inference_mode():
        for batch in batches:
            handle.adapter.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--lang", default="en")
    parser.add_argument("--sentences", type=int, default=96)
    parser.add_argument("--n-stat", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    handle = models.load(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    lang = data.languages([args.lang])[0]
    sentences = data.flores(data.resolve_root(None), lang, "dev").sentences[: args.sentences]
    prefix = prefix_token(handle.tokenizer, "auto")
    ids = tokenize(handle.tokenizer, sentences, prefix)
    batches = make_batches(ids, 1, args.n_stat, args.batch_size, handle.tokenizer.pad_token_id)
    n_tokens = sum(len(row) - 1 for row in ids)

    def record_once():
        ActivationRecorder(handle, args.n_stat).run(batches, desc="record")

    timings = {"forward": [], "record": []}
    plain_forward(handle, batches[:1])  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("forward", lambda: plain_forward(handle, batches)), ("record", record_once)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    forward, rec = (statistics.median(timings[k]) for k in ("forward", "record"))
    rows = sum(b.input_ids.numel() for b in batches) / len(batches)  # padded tokens per batch: the matmul rows
    context = statistics.mean(len(row) for row in ids) / 2  # mean causal context of a token
    gflops = matmul_gflops(handle.model, int(rows), args.repeats)
    per_token = body_flops_per_token(handle.model, context)
    roofline = gflops * 1e9 / per_token
    print(f"model={args.model} lang={args.lang} tokens={n_tokens} batches={len(batches)} threads={torch.get_num_threads()}")
    print(f"plain forward: {n_tokens / forward:8.1f} tok/s   recording: {n_tokens / rec:8.1f} tok/s")
    print(f"recording / forward throughput ratio: {forward / rec:.3f}  (goal >= 0.95)")
    print(f"matmul on the body's shapes ({int(rows)} rows): {gflops:.1f} GFLOP/s; "
          f"body {per_token / 1e6:.1f} MFLOP/token; roofline {roofline:.1f} tok/s")
    print(f"forward / roofline: {n_tokens / forward / roofline:.3f}   recording / roofline: "
          f"{n_tokens / rec / roofline:.3f}  (goal >= 0.75)")


if __name__ == "__main__":
    main()
