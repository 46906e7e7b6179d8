"""Free-generation steering table: share of continuations labelled as the target language (restricted py3langid,
id and ms counting for each other: lsn_exp/lid.py).

    .venv/bin/python scripts/steering_table.py [--model gemma3_270m] [--sets lape,baseline]
        [--factors pmax,pmedian,5] [--out steering.md]

For each target (every identified language but English), 8 neutral English prompts are continued
greedily for 25 tokens, unpatched and under each patch. Prints a markdown table with the counts
(out of 8) and one example continuation per target.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, REPO_ROOT, data, generate, identify, lid
from lsn_exp.patch import Patch
from lsn_exp.specs import PatchSpec, parse_factor

NEUTRAL = data.prompts_from_file(REPO_ROOT / "scripts" / "neutral_prompts.yaml")["en"]


def steering_counts(handle, neurons, neuron_set: str, factor: str, targets: list[str]) -> dict:
    patch_cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "patch" / "default.yaml"), {"neuron_set": neuron_set})
    out = {}
    for target in targets:
        spec = PatchSpec.from_config(patch_cfg, parse_factor(factor), target)
        gens = generate.generate_labelled(handle, NEUTRAL, patch=Patch(handle, neurons, spec), fluency=False)
        out[target] = gens
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--sets", default="lape,baseline")
    parser.add_argument("--factors", default="pmax,pmedian,5")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    handle, neurons = identify.load_with_neurons(args.model)
    targets = [code for code in neurons.languages if code != "en"]
    unpatched = generate.generate_labelled(handle, NEUTRAL, fluency=False)
    columns = [(s, f) for s in args.sets.split(",") for f in args.factors.split(",")]
    results = {col: steering_counts(handle, neurons, col[0], col[1], targets) for col in columns}
    lines = ["| target | unpatched | " + " | ".join(f"{s} {f}" for s, f in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for t in targets:
        row = [str(sum(lid.counts_as(g.label, t) for g in unpatched))]
        row += [str(sum(lid.counts_as(g.label, t) for g in results[col][t])) for col in columns]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    totals = [sum(sum(lid.counts_as(g.label, t) for g in results[col][t]) for t in targets) for col in columns]
    lines.append("| total /136 | " + str(sum(sum(lid.counts_as(g.label, t) for g in unpatched) for t in targets))
                 + " | " + " | ".join(map(str, totals)) + " |")
    lines += ["", "Examples (first prompt, first column's patch):", ""]
    first = columns[0]
    lines.append(f"- unpatched: {unpatched[0].prompt!r} -> {unpatched[0].text!r} [{unpatched[0].label}]")
    for t in targets:
        g = results[first][t][0]
        lines.append(f"- {t}: {g.text!r} [{g.label}]")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
