"""How close engine=vllm comes to the transformers engine, per model, dtype and intervention kind (the README's table).

    .venv-vllm/bin/python scripts/vllm_equivalence.py [--models smollm2_135m gemma3_270m] [--dtypes float32 bfloat16]
                                                      [--prompts 4]

For each kind (tests/test_vllm.py's KINDS, on a random 1 % of each layer's neurons, toward fr) both engines decode
the same FLORES openings (en, fr, id) greedily; then both score the transformers engine's continuations (the same
requests) and the table gives the largest and median |Δ mean NLL per token| and the share of prompts whose greedy
continuations are identical, with its n.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from contextlib import nullcontext

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from omegaconf import OmegaConf  # noqa: E402

from lsn_exp import CONF_DIR, REPO_ROOT, models, vllmengine  # noqa: E402
from lsn_exp.engine import Generated, HFEngine  # noqa: E402
from lsn_exp.settings import EngineSettings  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "tests"))
from conftest import synthetic_neurons  # noqa: E402
from test_vllm import KINDS, NEW_TOKENS, as_ids, openings  # noqa: E402


def compare(hf: HFEngine, engine, neurons, spec, prompts: list[str]) -> tuple[float, float, int]:
    """(max |Δ NLL|, median |Δ NLL|, prompts decoded identically) under ``spec`` (None: unpatched)."""
    gaps, same = [], 0
    for prompt in prompts:
        with nullcontext() if spec is None else hf.intervene(neurons, spec):
            ours = hf.generate([prompt], NEW_TOKENS)
            hf_nll = hf.continuation_nll([prompt], ours)[0]
        with nullcontext() if spec is None else engine.intervene(neurons, spec):
            theirs = engine.generate([prompt], NEW_TOKENS)
            nll = engine.continuation_nll([prompt], Generated(ours.texts, as_ids(ours)))[0]
        same += theirs.texts == ours.texts
        if hf_nll is not None:
            gaps.append(abs(nll - hf_nll))
    return max(gaps), statistics.median(gaps), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2_135m", "gemma3_270m"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=4, help="per language (en, fr, id)")
    args = parser.parse_args()
    prompts = openings(REPO_ROOT.parent / "shared" / "data", per_lang=args.prompts)
    print(f"CPU: {models.accelerator_name('cpu')}; {len(prompts)} prompts, {NEW_TOKENS} new tokens\n")
    print("| model | dtype | intervention | max abs Δ NLL | median abs Δ NLL | identical greedy continuations |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for dtype in args.dtypes:
            cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"),
                                  {"dtype": dtype, "device": "cpu"})
            handle = models.load(cfg)
            engine = vllmengine.start(handle, cfg, EngineSettings(name="vllm", max_model_len=512))
            neurons = synthetic_neurons(handle, ["en", "fr", "id"], rate=0.01, vectors=True)
            for kind, spec in {"unpatched": None, **KINDS}.items():
                top, median, same = compare(HFEngine(handle), engine, neurons, spec, prompts)
                print(f"| {name} | {dtype} | {kind} | {top:.2e} | {median:.2e} | {same}/{len(prompts)} |", flush=True)
            del engine, handle
            gc.collect()


if __name__ == "__main__":
    main()
