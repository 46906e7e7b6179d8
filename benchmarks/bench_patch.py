"""Forward time patched / unpatched on Gemma-3-270M, side by side in one run.

    python benchmarks/bench_patch.py [--repeats 9] [--batch 8] [--tokens 64] [--rate 0.01] [--threads 1] [--full]

Goals (issue 5): multiply (weight edit) 1.00, set-to-pmax (one hook per layer) <= 1.10. The statistic and
hook-multiply rows are for information. By default the decoder is timed without its LM head (the patch
never touches it, and on CPU its 262k-wide matmul would dilute the ratios); --full times the whole model.
Measurements are interleaved: each round runs one forward per variant, in rotating order, and the ratio
is the median over rounds of variant / unpatched within the round, so drift on a shared CPU cancels. On CPU it
runs one thread by default: on a busy machine every multi-threaded op waits for its slowest thread, which
made forwards 5-10x slower and their times swing by 2x here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lsn_exp.models import ModelHandle, load
from lsn_exp.neuronset import NeuronSet
from lsn_exp.patch import Patch
from lsn_exp.specs import PatchSpec

REPO = Path(__file__).resolve().parents[1]
LANGS = ["en", "id"]


def synthetic_neurons(handle: ModelHandle, rate: float, seed: int = 0) -> NeuronSet:
    """About ``rate`` of each layer's neurons per language (LAPE sets are ~1%); p_max > p_median > 0."""
    shape = (len(LANGS), handle.adapter.n_layers, handle.adapter.d_ff)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < rate
    p_max = torch.rand(shape, generator=gen) + 0.5
    return NeuronSet(languages=LANGS, masks={"lape": mask, "baseline": mask, "random": mask}, p_max=p_max,
                          p_median=p_max / 2, activation_prob=torch.rand(shape, generator=gen), meta={})


def variants(handle: ModelHandle, neurons: NeuronSet) -> dict[str, object]:
    """name -> a context manager factory; the first is the baseline."""
    def patch(spec: PatchSpec, **kwargs):
        return lambda: Patch(handle, neurons, spec, **kwargs)

    return {
        "unpatched": nullcontext,
        "mul x5 (weight edit)": patch(PatchSpec("id", op="mul", value=5.0)),
        "set pmax (hook)": patch(PatchSpec("id", op="set", source="pmax")),
        "mul x5 (hook)": patch(PatchSpec("id", op="mul", value=5.0), weight_edit=False),
        "set max (stat hook)": patch(PatchSpec("id", op="set", stat="max")),
    }


def make_batch(handle: ModelHandle, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, handle.model.config.vocab_size, (batch, tokens), generator=gen)
    return {"input_ids": ids.to(handle.device), "attention_mask": torch.ones_like(ids).to(handle.device)}


def timed_forward(forward, inputs: dict[str, torch.Tensor], device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    forward(**inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def run(repeats: int, batch: int, tokens: int, rate: float, full: bool, threads: int) -> dict[str, list[float]]:
    handle = load(OmegaConf.load(REPO / "conf" / "model" / "gemma3_270m.yaml"))
    if handle.device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    neurons = synthetic_neurons(handle, rate)
    counts = neurons.mask("lape", "id").sum(dim=1)
    print(f"{handle.name}: {handle.adapter.n_layers} layers x d_ff {handle.adapter.d_ff}, {handle.device}, "
          f"{next(handle.model.parameters()).dtype}, {torch.get_num_threads()} threads; target neurons "
          f"{int(counts.sum())} ({int(counts.min())}-{int(counts.max())} per layer); batch {batch} x {tokens}; "
          f"{'full model' if full else 'decoder without LM head'}")
    forward = handle.model if full else handle.adapter.decoder
    inputs = make_batch(handle, batch, tokens)
    contexts = variants(handle, neurons)
    names = list(contexts)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 1):  # round 0 warms every variant up
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            with contexts[name]():
                elapsed = timed_forward(forward, inputs, handle.device)
            if round_:
                times[name].append(elapsed)
    return times


def report(times: dict[str, list[float]]) -> None:
    base = next(iter(times.values()))
    goals = {"mul x5 (weight edit)": "goal 1.00", "set pmax (hook)": "goal <= 1.10"}
    print(f"{'variant':24s} {'median ms':>10s} {'min ms':>8s} {'ratio':>7s}  (ratio = median of per-round ratios)")
    for name, values in times.items():
        ratio = statistics.median(value / unpatched for value, unpatched in zip(values, base))
        print(f"{name:24s} {1000 * statistics.median(values):10.1f} {1000 * min(values):8.1f} {ratio:7.3f}  "
              f"{goals.get(name, '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.01, help="share of each layer's neurons in the set")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--full", action="store_true", help="time the whole model, LM head included")
    args = parser.parse_args()
    started = time.time()
    report(run(args.repeats, args.batch, args.tokens, args.rate, args.full, args.threads))
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
