"""LSS in bf16 against fp32 on the same facts and neurons: a no-op must score exactly 0, and how far pmax moves.

    .venv/bin/python scripts/bf16_check.py [--model gemma3_270m] [--targets id,ja] [--n-facts 185]

Loads the model twice (fp32, bf16) on the CPU, takes the fp32 neuron set (default identification, cached)
for both, and scores the 15-source x len(targets) LSS matrix with a no-op patch (x1) and with pmax. Both dtypes
take the unpatched scores from a run in the patched run's own layout (LssEvaluator.paired_layout, every dtype
since LSS_VERSION 4); the 1.63-nat bf16 figure in conf/lss/default.yaml is from the earlier shared columns.
Prints the no-op shift distribution per dtype, facts within the tolerance, and the bf16 - fp32 gaps.
``--fp32-specs pmax`` skips the fp32 no-op.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, identify, lss, metrics, models
from lsn_exp.cache import CacheStore
from lsn_exp.results import mean_over
from lsn_exp.settings import default_tol, lss_settings
from lsn_exp.specs import PatchSpec

SPECS = {"noop": lambda t: PatchSpec(t, op="mul", value=1.0), "pmax": lambda t: PatchSpec(t, op="set", source="pmax")}


def shifts(handle, neurons, cfg, store, names) -> dict:
    """name -> (cells, {(source, target): per-fact shift [N] with NaN for skipped facts})."""
    evaluator = lss.LssEvaluator(handle, cfg, None, store)
    if not evaluator.paired_layout():
        evaluator.unpatched.ensure(evaluator.settings.targets)
    out = {}
    for name in names:
        spec_for = SPECS[name]
        start = time.time()
        cells, per_fact = [], {}
        for target in evaluator.settings.targets:
            by_source, _, _, _ = evaluator.deltas(neurons, spec_for(target))
            for source, shift in by_source.items():
                per_fact[(source, target)] = shift
                cells.append(metrics.lss_cell(source, target, shift, evaluator.settings.tol, 0, 0))
        out[name] = (cells, per_fact)
        print(f"  {name}: {len(cells)} cells in {time.time() - start:.0f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--targets", default="id,ja")
    parser.add_argument("--n-facts", type=int, default=185)
    parser.add_argument("--fp32-specs", default="noop,pmax")
    args = parser.parse_args()
    model_cfg = OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml")
    fp32, neurons = identify.load_with_neurons(args.model)
    bf16 = models.load(OmegaConf.merge(model_cfg, {"dtype": "bfloat16", "device": "cpu"}))
    cfg = lss_settings({"n_facts": args.n_facts, "targets": args.targets.split(","), "bootstrap": 0})
    store = CacheStore.for_model(args.model)
    results = {}
    for name, handle, names in (("float32", fp32, args.fp32_specs.split(",")), ("bfloat16", bf16, list(SPECS))):
        print(f"{name}:")
        results[name] = shifts(handle, neurons, cfg, store, names)
    tols = {name: default_tol(name) for name in results}
    for name, by_spec in results.items():
        if "noop" not in by_spec:
            continue
        cells, per_fact = by_spec["noop"]
        noise = np.abs(np.concatenate([s[~np.isnan(s)] for s in per_fact.values()]))
        wins = sum(c.wins for c in cells)
        print(f"{name} no-op: {len(cells)} cells, LSS 0 in {sum(c.lss == 0 for c in cells)}, wins {wins}; "
              f"|shift| max {noise.max():.3g}, 99.9th pct {np.percentile(noise, 99.9):.3g}, median "
              f"{np.median(noise):.3g} nats over {noise.size} facts (tol {tols[name]:g})")
    for name, by_spec in results.items():
        cells, _ = by_spec["pmax"]
        print(f"{name} pmax: mean LSS {mean_over(cells, 'lss'):.4f} (paper count {mean_over(cells, 'lss_paper'):.4f}),"
              f" facts within tol {sum(c.within_tol for c in cells)} of {sum(c.n for c in cells)}")
    (c32, f32), (c16, f16) = results["float32"]["pmax"], results["bfloat16"]["pmax"]
    gap = np.abs(np.concatenate([f16[k] - f32[k] for k in f32]))
    gap = gap[~np.isnan(gap)]
    flips = sum(int(((f16[k] > tols["bfloat16"]) != (f32[k] > tols["float32"]))[~np.isnan(f32[k])].sum()) for k in f32)
    cell_gap = [abs(a.lss - b.lss) for a, b in zip(c16, c32) if a.n]
    print(f"bf16 - fp32 pmax: mean LSS {mean_over(c16, 'lss') - mean_over(c32, 'lss'):+.4f}; per cell |Δ| max "
          f"{max(cell_gap):.4f}, mean {np.mean(cell_gap):.4f}; per-fact |Δ shift| median {np.median(gap):.3g}, max "
          f"{gap.max():.3g} nats; facts whose win flips {flips} of {gap.size}")


if __name__ == "__main__":
    main()
