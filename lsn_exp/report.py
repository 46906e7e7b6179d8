"""``python -m lsn_exp.report SWEEP_DIR``: tables, CSVs and heatmaps from a sweep's local results.

Reads only the run dirs (``*/results.json`` and Hydra's ``.hydra/overrides.yaml``); works on partial
sweeps and lists the cells that have no complete results.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lsn_exp import plots
from lsn_exp.tracking import RESULTS_FILE


@dataclass
class Cell:
    run_dir: Path
    overrides: dict
    results: dict | None  # None: no complete results
    config: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        cfg = self.config
        return (cfg.get("model", {}).get("name") or self.overrides.get("model", "?"),
                cfg.get("lang", {}).get("code") or self.overrides.get("lang", "?"),
                str(cfg.get("factor", self.overrides.get("factor", "?"))))


def _overrides(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return dict(item.split("=", 1) for item in items or [] if "=" in item)


def collect(sweep_dir: Path) -> list[Cell]:
    cells = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: (len(p.name), p.name)):
        results_path = run_dir / RESULTS_FILE
        if results_path.exists():
            payload = json.loads(results_path.read_text())
            cells.append(Cell(run_dir, _overrides(run_dir), payload["results"], payload["config"],
                              payload.get("images", {})))
        elif (run_dir / ".hydra").exists():
            cells.append(Cell(run_dir, _overrides(run_dir), None))
    return cells


def expected_cells(sweep_dir: Path) -> list[dict]:
    """The sweep's grid (its sweep axes only) from Hydra's multirun.yaml, parsed as Hydra parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return []
    task = yaml.safe_load(path.read_text())["hydra"]["overrides"]["task"]
    axes = [[(o.get_key_element(), v) for v in o.sweep_string_iterator()]
            for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    return [dict(combo) for combo in itertools.product(*axes)]


def missing_cells(sweep_dir: Path, cells: list[Cell]) -> list[dict]:
    """Grid cells without complete results; without a multirun.yaml, the run dirs lacking results."""
    grid = expected_cells(sweep_dir)
    if not grid:
        return [c.overrides for c in cells if c.results is None]
    complete = [c.overrides for c in cells if c.results is not None]
    return [cell for cell in grid if not any(all(done.get(k) == v for k, v in cell.items()) for done in complete)]


def headline_metrics(results: dict, lang: str) -> dict:
    """The few numbers a cell is judged by, whichever stages it ran."""
    out = {}
    if "identify" in results:
        out["lape_neurons"] = results["identify"]["lape_neurons"].get(lang)
    if "generate" in results:
        out["gen_target_unpatched"] = results["generate"]["target_share_unpatched"]
        out["gen_target_patched"] = results["generate"]["target_share_patched"]
    if "mean" in results.get("lss", {}):
        out["lss_mean"] = results["lss"]["mean"]
    if "lss_matrix" in results:
        out["lss_offdiag"] = results["lss_matrix"]["mean_offdiag"]
    for family, metrics in results.get("downstream", {}).get("summary", {}).items():
        for metric, entry in metrics.items():
            out[f"{family}_{metric}_self"] = entry.get("self")
            out[f"{family}_{metric}_cross"] = entry.get("cross")
    out["wall_time_s"] = results.get("wall_time_s")
    return out


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(v) for v in row) + " |" for row in rows)]


def pivot_heatmaps(done: list[Cell], metric: str, out_dir: Path) -> list[Path]:
    """One heatmap per model: rows = language, columns = factor, cells = ``metric``."""
    images = []
    by_model = defaultdict(dict)
    for cell in done:
        model, lang, factor = cell.key
        value = headline_metrics(cell.results, lang).get(metric)
        if value is not None:
            by_model[model][(lang, factor)] = value
    for model, values in sorted(by_model.items()):
        langs = sorted({k[0] for k in values})
        factors = sorted({k[1] for k in values})
        matrix = [[values.get((l, f), float("nan")) for f in factors] for l in langs]
        images.append(plots.heatmap(matrix, langs, factors, f"{model}: {metric}", out_dir / f"{model}_{metric}.png",
                                    xlabel="factor", ylabel="target language"))
    return images


def lss_cells(cell: Cell) -> list[dict]:
    """Every (source, target) LSS cell a run scored: a job toward one target or a full matrix."""
    from lsn_exp.lss import read_cells

    if isinstance(cell.results.get("lss"), dict) and cell.results["lss"].get("cells"):
        return cell.results["lss"]["cells"]
    path = cell.run_dir / "lss_cells.csv"
    return read_cells(path) if "lss_matrix" in cell.results and path.exists() else []


def lss_section(done: list[Cell], sweep_dir: Path, n_boot: int = 1000) -> list[str]:
    """LSS by model x factor: mean over (source, target) cells with a bootstrap 95 % CI over cells, the weakest
    cell, and the assembled source x target matrix (CSV + heatmap) of every model and factor."""
    import numpy as np

    from lsn_exp.lss import matrix_heatmap, write_matrix_csv

    groups = defaultdict(dict)
    for cell in done:
        for c in lss_cells(cell):
            if c["n"]:  # a cell with no scored fact has no LSS
                groups[(cell.key[0], cell.key[2])][(c["source"], c["target"])] = c
    if not groups:
        return []
    rows, images = [], []
    for (model, factor), cells in sorted(groups.items()):
        values = np.array([c["lss"] for c in cells.values()])
        boot = values[np.random.default_rng(0).integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
        weakest = min(cells.values(), key=lambda c: (c["lss"], c["source"], c["target"]))
        rows.append([model, factor, float(values.mean()), f"[{np.percentile(boot, 2.5):.3f}, "
                     f"{np.percentile(boot, 97.5):.3f}]", len(values),
                     f"{weakest['source']}→{weakest['target']} {weakest['lss']:.2f} "
                     f"[{weakest['ci_low']:.2f}, {weakest['ci_high']:.2f}]"])
        sources = sorted({s for s, _ in cells})
        targets = sorted({t for _, t in cells})
        matrix = {s: {t: cells[(s, t)]["lss"] for t in targets if (s, t) in cells} for s in sources}
        stem = f"lss_matrix_{model}_{factor}"
        write_matrix_csv(sweep_dir / f"{stem}.csv", sources, targets, matrix)
        images.append(matrix_heatmap(matrix, sources, targets, f"LSS {model} factor={factor}",
                                     sweep_dir / f"{stem}.png"))
    return ["## LSS by model x factor (cells = source→target pairs; CI: bootstrap over cells)", "",
            *markdown_table(["model", "factor", "mean LSS", "95% CI", "cells", "weakest cell [its CI]"], rows), "",
            *(f"![{p.stem}]({p.name})" for p in images), ""]


def downstream_section(done: list[Cell], sweep_dir: Path) -> list[str]:
    """Self- vs cross-language delta matrices (task language x patched language), per model and factor."""
    from lsn_exp.downstream import downstream_matrices

    groups = defaultdict(list)
    for cell in done:
        if "downstream" in cell.results:
            groups[(cell.key[0], cell.key[2])].append(cell.results["downstream"])
    lines = []
    for (model, factor), results in sorted(groups.items()):
        out_dir = sweep_dir / f"downstream_{model}_{factor}"
        out_dir.mkdir(exist_ok=True)
        made = downstream_matrices(results, out_dir, title=f"{model} factor={factor}")
        lines += [f"## Downstream deltas: {model}, factor={factor}", ""]
        lines += [f"![{key}]({Path(path).relative_to(sweep_dir)})" for key, path in made["images"].items()]
        lines.append("")
    return lines


def build_report(sweep_dir: Path) -> Path:
    cells = collect(sweep_dir)
    done = [c for c in cells if c.results is not None]
    metric_names = sorted({k for c in done for k in headline_metrics(c.results, c.key[1])})
    rows = [[*c.key, *(headline_metrics(c.results, c.key[1]).get(m) for m in metric_names)] for c in done]
    header = ["model", "lang", "factor", *metric_names]
    write_csv(sweep_dir / "report_cells.csv", header, rows)
    main_metric = next((m for m in ("lss_mean", "lss_offdiag", "gen_target_patched") if m in metric_names), None)
    images = pivot_heatmaps(done, main_metric, sweep_dir) if main_metric else []
    missing = missing_cells(sweep_dir, cells)

    lines = [f"# lsn_exp report: {sweep_dir.name}", "",
             f"{len(done)} complete cell(s); {len(missing)} missing.", "", "## Cells", "",
             *markdown_table(header, rows), ""]
    if main_metric:
        lines += [f"## {main_metric} by model x factor (mean over languages)", ""]
        agg = defaultdict(list)
        for cell, row in zip(done, rows):
            value = row[header.index(main_metric)]
            if value is not None:
                agg[(cell.key[0], cell.key[2])].append(value)
        lines += markdown_table(["model", "factor", main_metric, "n langs"],
                                [[m, f, sum(v) / len(v), len(v)] for (m, f), v in sorted(agg.items())])
        lines += ["", *(f"![{p.stem}]({p.name})" for p in images), ""]
    lines += lss_section(done, sweep_dir)
    lines += downstream_section(done, sweep_dir)
    cell_images = [(c, Path(p)) for c in done for p in c.images.values() if "heatmap" in Path(p).stem
                   or "matrix" in Path(p).stem]
    if cell_images:
        lines += ["## Figures per cell", ""]
        lines += [f"![{' '.join(c.key)} {p.stem}]({p.relative_to(sweep_dir) if p.is_relative_to(sweep_dir) else p})"
                  for c, p in cell_images]
        lines.append("")
    if missing:
        lines += ["## Missing cells", "", *(f"- {' '.join(f'{k}={v}' for k, v in m.items())}" for m in missing), ""]
    path = sweep_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lsn_exp.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"lsn_exp.report: error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    print(build_report(args.sweep_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
