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
        out["lss_mean_paper"] = results["lss"].get("mean_paper")
    if "lss_matrix" in results:
        out["lss_offdiag"] = results["lss_matrix"]["mean_offdiag"]
        out["lss_offdiag_paper"] = results["lss_matrix"].get("mean_offdiag_paper")
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


def fact_bootstrap(cells: list[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]] | None:
    """95% CIs of the mean LSS over ``cells`` (and of the paper count), resampling facts, not cells.

    The cells of a model x factor share their facts (every source prompts the same sample, every target patches
    it), so one resample of facts recomputes every cell, and the mean over cells, from it. Needs each cell's
    ``outcomes`` (one character per fact: 1 win, 0 no win, s skipped) over one common sample; None otherwise.
    """
    import numpy as np

    outcomes = [c.get("outcomes") or "" for c in cells]
    n_facts = len(outcomes[0]) if outcomes else 0
    if not n_facts or any(len(o) != n_facts for o in outcomes):
        return None
    wins = np.array([[ch == "1" for ch in o] for o in outcomes], dtype=np.float64)  # [C, N]
    scored = np.array([[ch != "s" for ch in o] for o in outcomes], dtype=np.float64)  # [C, N]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_facts, size=(n_boot, n_facts))
    counts = np.stack([np.bincount(row, minlength=n_facts) for row in draws]).T.astype(np.float64)  # [N, B]
    won, seen = wins @ counts, scored @ counts  # [C, B]
    with np.errstate(invalid="ignore", divide="ignore"):
        lss = np.nanmean(np.where(seen > 0, won / seen, np.nan), axis=0)  # [B]
    paper = (won / n_facts).mean(axis=0)
    return {name: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)))
            for name, v in (("lss", lss), ("lss_paper", paper))}


def lss_section(done: list[Cell], sweep_dir: Path, n_boot: int = 1000) -> list[str]:
    """LSS by model x factor: the mean over (source, target) cells, with same-string facts skipped and with the
    paper's count side by side, each with a 95 % CI from a bootstrap over facts; the weakest cell; and the
    assembled source x target matrices (CSV + heatmap) of every model and factor."""
    from lsn_exp.lss import cell_matrix, matrix_heatmap, mean_of, write_matrix_csv

    groups = defaultdict(dict)
    for cell in done:
        for c in lss_cells(cell):
            groups[(cell.key[0], cell.key[2])][(c["source"], c["target"])] = c
    if not groups:
        return []
    rows, images = [], []
    for (model, factor), by_pair in sorted(groups.items()):
        cells = [c for c in by_pair.values() if c["n"]]  # a cell with no scored fact has no LSS
        ci = fact_bootstrap(cells, n_boot)
        interval = (lambda name: "—" if ci is None else f"[{ci[name][0]:.3f}, {ci[name][1]:.3f}]")  # noqa: E731
        weakest = min(cells, key=lambda c: (c["lss"], c["source"], c["target"]))
        rows.append([model, factor, mean_of(cells, "lss"), interval("lss"), mean_of(cells, "lss_paper"),
                     interval("lss_paper"), len(cells), f"{weakest['source']}→{weakest['target']} "
                     f"{weakest['lss']:.2f} [{weakest['ci_low']:.2f}, {weakest['ci_high']:.2f}]"])
        sources = sorted({s for s, _ in by_pair})
        targets = sorted({t for _, t in by_pair})
        for suffix, key in (("", "lss"), ("_paper", "lss_paper")):
            stem = f"lss_matrix_{model}_{factor}{suffix}"
            matrix = cell_matrix(cells, sources, targets, key)
            write_matrix_csv(sweep_dir / f"{stem}.csv", sources, targets, matrix)
            images.append(matrix_heatmap(matrix, sources, targets, f"{key} {model} factor={factor}",
                                         sweep_dir / f"{stem}.png"))
    header = ["model", "factor", "mean LSS", "95% CI", "mean LSS (paper count)", "95% CI (paper)", "cells",
              "weakest cell [its CI]"]
    return ["## LSS by model x factor (cells = source→target pairs; CIs: bootstrap over facts)", "",
            "LSS skips facts whose source and target objects are the same string; the paper count keeps them "
            "as non-wins.", "", *markdown_table(header, rows), "", *(f"![{p.stem}]({p.name})" for p in images), ""]


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
