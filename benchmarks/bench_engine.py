"""Generation throughput, unpatched and patched, on the transformers engine and on vLLM, side by side in one run.

    .venv-vllm/bin/python benchmarks/bench_engine.py [--model smollm2_135m] [--batch 32] [--new-tokens 32]
                                                     [--rounds 3] [--dtype float32] [--compiled]

Each engine decodes the same batch of FLORES devtest openings greedily through its ``generate`` (the path the
generate stage runs), unpatched and under neuron patches on ~1 % of each layer's neurons (set to p_max; multiply
by 4), and on vLLM's own model without lsn_exp's buffers (the plugin off: what the buffers cost unpatched).
Throughput = new tokens kept / wall seconds. Rounds interleave every (engine, variant) in rotating order;
each ratio is the median over rounds of the two runs in the same round, so drift on a shared CPU cancels.
The goal (issue 25): vLLM patched / unpatched >= 0.8 at batch 32. Prints a markdown table and the CPU's name.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from bench_patch import synthetic_neurons  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lsn_exp import CONF_DIR, REPO_ROOT, data, models, vllmengine  # noqa: E402
from lsn_exp.engine import HFEngine  # noqa: E402
from lsn_exp.settings import EngineSettings  # noqa: E402
from lsn_exp.specs import PatchSpec  # noqa: E402

PATCHES = {"unpatched": None, "set pmax": PatchSpec("id", op="set", source="pmax"),
           "mul x4": PatchSpec("id", op="mul", value=4.0)}


def prompts(batch: int, words: int = 6) -> list[str]:
    english = data.languages(["en"])[0]
    sentences = data.flores(REPO_ROOT.parent / "shared" / "data", english, "devtest").sentences[:batch]
    return [" ".join(sentence.split()[:words]) for sentence in sentences]


def timed(engine, neurons, spec, batch: list[str], new_tokens: int) -> float:
    """Tokens per second of one batched greedy generation under ``spec`` (None: unpatched)."""
    with nullcontext() if spec is None else engine.intervene(neurons, spec):
        start = time.perf_counter()
        out = engine.generate(batch, new_tokens)
        seconds = time.perf_counter() - start
    kept = out.tokens[1].sum().item() if isinstance(engine, HFEngine) else sum(len(ids) for ids in out.tokens)
    return kept / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compiled", action="store_true", help="vLLM with compilation (enforce_eager=False)")
    args = parser.parse_args()
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"),
                          {"dtype": args.dtype, "device": "cpu"})
    handle = models.load(cfg)
    settings = EngineSettings(name="vllm", enforce_eager=not args.compiled, max_num_seqs=args.batch)
    engines = {"hf": HFEngine(handle), "vllm (no buffers)": vllmengine.start(handle, cfg, settings, steerable=False),
               "vllm": vllmengine.start(handle, cfg, settings)}
    neurons, batch = synthetic_neurons(handle, rate=0.01), prompts(args.batch)
    runs = [(engine, variant) for engine in engines for variant in PATCHES if engine != "vllm (no buffers)" or
            variant == "unpatched"]
    for engine in engines.values():  # warm-up: first-call allocations out of the timings
        timed(engine, neurons, None, batch, 4)
    speed: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for round_ in range(args.rounds):
        for k in range(len(runs)):
            engine, variant = runs[(k + round_) % len(runs)]
            speed[engine, variant].append(timed(engines[engine], neurons, PATCHES[variant], batch, args.new_tokens))
    print(f"\n{args.model} {args.dtype}, batch {args.batch}, {args.new_tokens} new tokens, {args.rounds} rounds, "
          f"vLLM {'compiled' if args.compiled else 'eager'}; CPU: {models.accelerator_name('cpu')}\n")
    print("| engine | variant | tokens/s (median) | ÷ same engine unpatched | ÷ vLLM without buffers "
          "| ÷ transformers unpatched |")
    print("|---|---|---|---|---|---|")
    for engine, variant in runs:
        ratios = [statistics.median(a / b for a, b in zip(speed[engine, variant], speed[base, "unpatched"]))
                  for base in (engine, "vllm (no buffers)", "hf")]
        print(f"| {engine} | {variant} | {statistics.median(speed[engine, variant]):.1f} | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
