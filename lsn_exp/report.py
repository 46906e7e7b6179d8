"""``python -m lsn_exp.report SWEEP_DIR``: report.md, one self-contained report.html, CSVs and heatmaps from a
sweep's local results, and (when the cells logged to W&B) one summary W&B run of job type ``report``.

Reads only the run dirs (``*/results.json`` and Hydra's ``.hydra/overrides.yaml``); works on partial
sweeps and lists the cells that have no complete results.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lsn_exp import outputs, webpage
from lsn_exp.metrics import fact_bootstrap
from lsn_exp.results import RESULTS_FILE, SCHEMA_VERSION, LssCell, LssMatrix, LssResult, from_json, mean_over


@dataclass
class SweepRun:
    """One run dir of a sweep (one grid point), with its typed results when complete."""

    run_dir: Path
    overrides: dict
    results: dict | None  # stage -> typed result (lsn_exp.results); None: no complete results
    config: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        """(model, lang, recipe): the recipe is the factor, prefixed by the method when it is not a neuron patch
        alone (``diffmean/1``, ``neurons_no_en/pmax``)."""
        cfg = self.config
        factor = str(cfg.get("factor", self.overrides.get("factor", "?")))
        method = cfg.get("method_name", "neurons")
        return (cfg.get("model", {}).get("name") or self.overrides.get("model", "?"),
                cfg.get("lang", {}).get("code") or self.overrides.get("lang", "?"),
                factor if method == "neurons" else f"{method}/{factor}")


def _overrides(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return dict(item.split("=", 1) for item in items or [] if "=" in item)


def collect(sweep_dir: Path) -> list[SweepRun]:
    runs = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: (len(p.name), p.name)):
        results_path = run_dir / RESULTS_FILE
        payload = json.loads(results_path.read_text()) if results_path.exists() else None
        if payload is not None and payload.get("schema_version") != SCHEMA_VERSION:
            print(f"lsn_exp.report: {results_path} has results schema {payload.get('schema_version')}, this report "
                  f"reads {SCHEMA_VERSION}: listed as missing (re-run the cell with force=true)", file=sys.stderr)
            payload = None
        if payload is not None:
            runs.append(SweepRun(run_dir, _overrides(run_dir), from_json(payload["results"]), payload["config"],
                                 payload.get("images", {})))
        elif (run_dir / ".hydra").exists():
            runs.append(SweepRun(run_dir, _overrides(run_dir), None))
    return runs


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


def missing_cells(sweep_dir: Path, runs: list[SweepRun]) -> list[dict]:
    """Grid cells without complete results; without a multirun.yaml, the run dirs lacking results."""
    grid = expected_cells(sweep_dir)
    if not grid:
        return [c.overrides for c in runs if c.results is None]
    complete = [c.overrides for c in runs if c.results is not None]
    return [cell for cell in grid if not any(all(done.get(k) == v for k, v in cell.items()) for done in complete)]


def headline_metrics(results: dict, lang: str) -> dict:
    """The few numbers a cell is judged by, whichever stages it ran."""
    out = {}
    if "identify" in results:
        out["lape_neurons"] = results["identify"]["lape_neurons"].get(lang)
    if "generate" in results:
        out["gen_target_unpatched"] = results["generate"]["target_share_unpatched"]
        out["gen_target_patched"] = results["generate"]["target_share_patched"]
        out["gen_steering_success"] = results["generate"].get("steering_success")
    if isinstance(results.get("lss"), LssResult):
        out["lss_mean"], out["lss_mean_paper"] = results["lss"].mean, results["lss"].mean_paper
    if isinstance(results.get("lss_matrix"), LssMatrix):
        out["lss_offdiag"] = results["lss_matrix"].mean_offdiag
        out["lss_offdiag_paper"] = results["lss_matrix"].mean_offdiag_paper
    if "downstream" in results:
        for family, metrics in results["downstream"].summary().items():
            for metric, entry in metrics.items():
                out[f"{family}_{metric}_self"] = entry.get("self")
                out[f"{family}_{metric}_cross"] = entry.get("cross")
    out["wall_time_s"] = results.get("wall_time_s")
    return out


def pivot_heatmaps(done: list[SweepRun], metric: str, out_dir: Path) -> list[Path]:
    """One heatmap per model: rows = language, columns = factor, cells = ``metric``."""
    images = []
    by_model = defaultdict(dict)
    for run in done:
        model, lang, factor = run.key
        value = headline_metrics(run.results, lang).get(metric)
        if value is not None:
            by_model[model][(lang, factor)] = value
    for model, values in sorted(by_model.items()):
        images.append(outputs.pivot_heatmap(values, f"{model}: {metric}", out_dir / f"{model}_{metric}.png"))
    return images


def lss_cells(run: SweepRun) -> tuple[LssCell, ...]:
    """Every (source, target) LSS cell a run scored: a job toward one target or a full matrix."""
    found = [r for r in (run.results.get("lss"), run.results.get("lss_matrix"))
             if isinstance(r, (LssResult, LssMatrix))]
    return tuple(c for r in found for c in r.cells)


def lss_section(done: list[SweepRun], sweep_dir: Path, n_boot: int = 1000) -> list[str]:
    """LSS by model x factor: the mean over (source, target) cells, ours and the paper's rule (``lss_paper``)
    side by side, each with a 95 % CI from a bootstrap over facts; the weakest cell; and the
    assembled source x target matrices (CSV + heatmap) of every model and factor."""
    groups = defaultdict(dict)
    for run in done:
        for c in lss_cells(run):
            groups[(run.key[0], run.key[2])][(c.source, c.target)] = c
    if not groups:
        return []
    rows, images = [], []
    for (model, factor), by_pair in sorted(groups.items()):
        cells = [c for c in by_pair.values() if c.n]  # a cell with no scored fact has no LSS
        ci = fact_bootstrap(cells, n_boot)
        interval = (lambda name: "—" if ci is None else f"[{ci[name][0]:.3f}, {ci[name][1]:.3f}]")  # noqa: E731
        weakest = min(cells, key=lambda c: (c.lss, c.source, c.target))
        rows.append([model, factor, mean_over(cells, "lss"), interval("lss"), mean_over(cells, "lss_paper"),
                     interval("lss_paper"), len(cells), f"{weakest.source}→{weakest.target} "
                     f"{weakest.lss:.2f} [{weakest.ci_low:.2f}, {weakest.ci_high:.2f}]"])
        images += outputs.sweep_lss_matrices(cells, f"lss_matrix_{model}_{factor}", f"{model} factor={factor}",
                                             sweep_dir)
    header = ["model", "factor", "mean LSS", "95% CI", "mean LSS (paper's rule)", "95% CI (paper)", "cells",
              "weakest cell [its CI]"]
    return ["## LSS by model x factor (cells = source→target pairs; CIs: bootstrap over facts)", "",
            "LSS (ours) counts a shift above the tolerance and skips facts whose two objects are the same string; "
            "the paper's rule counts any shift above 0, over all facts (same-string ones are non-wins), with its "
            "prompt format (a space before the object in every language).", "", *outputs.markdown_rows(header, rows), "", *(f"![{p.stem}]({p.name})" for p in images),
            ""]


def layer_section(done: list[SweepRun], sweep_dir: Path) -> list[str]:
    """A per-layer sweep (+experiment=per_layer: each run patches or steers at one ``layer``): LSS and steering
    success by layer, one line per language and recipe, one figure per model and measure."""
    by_model: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for run in done:
        if isinstance(run.config.get("layer"), int):
            model, lang, recipe = run.key
            by_model[model][f"{lang} {recipe}"][run.config["layer"]] = headline_metrics(run.results, lang)
    lines = []
    for model, series in sorted(by_model.items()):
        n_layers = 1 + max(layer for values in series.values() for layer in values)
        lines += [f"## By layer: {model}", ""]
        for metric, what in (("lss_mean", "mean LSS"), ("gen_steering_success", "steering success")):
            curves = {label: [values.get(layer, {}).get(metric) for layer in range(n_layers)]
                      for label, values in sorted(series.items())}
            curves = {k: [float("nan") if v is None else v for v in vs] for k, vs in curves.items()}
            path = outputs.by_layer_plot(curves, f"{model}: {what} by layer", what,
                                         sweep_dir / f"report_by_layer_{model}_{metric}.png")
            lines += [f"![{path.stem}]({path.name})", ""]
    return lines


def downstream_section(done: list[SweepRun], sweep_dir: Path) -> list[str]:
    """Self- vs cross-language delta matrices (task language x patched language), per model and factor."""
    groups = defaultdict(list)
    for run in done:
        if "downstream" in run.results:
            groups[(run.key[0], run.key[2])].append(run.results["downstream"])
    lines = []
    for (model, factor), results in sorted(groups.items()):
        made = outputs.downstream_matrices(results, sweep_dir / f"downstream_{model}_{factor}",
                                           title=f"{model} factor={factor}")
        lines += [f"## Downstream deltas: {model}, factor={factor}", ""]
        lines += [f"![{key}]({Path(path).relative_to(sweep_dir)})" for key, path in made["images"].items()]
        lines.append("")
    return lines


def compare_section(done: list[SweepRun], sweep_dir: Path) -> list[str]:
    """Every stage=compare cell: its method x target table and steering-vs-fluency scatter."""
    lines = []
    for run in done:
        rows = (run.results.get("compare") or {}).get("rows")
        if not rows:
            continue
        tests = (run.results.get("compare") or {}).get("tests") or []
        lines += [f"## Methods side by side: {run.key[0]}", "", *outputs.compare_markdown(rows, tests), ""]
        for name in ("compare_scatter.png", "compare_search.png"):
            if (run.run_dir / name).is_file():
                lines += [f"![{run.key[0]} {name[:-4]}]({(run.run_dir / name).relative_to(sweep_dir)})", ""]
    return lines


def build_report(sweep_dir: Path) -> Path:
    runs = collect(sweep_dir)
    done = [run for run in runs if run.results is not None]
    metric_names = sorted({k for c in done for k in headline_metrics(c.results, c.key[1])})
    rows = [[*c.key, *(headline_metrics(c.results, c.key[1]).get(m) for m in metric_names)] for c in done]
    header = ["model", "lang", "factor", *metric_names]
    outputs.write_csv(sweep_dir / "report_cells.csv", header, rows)
    main_metric = next((m for m in ("lss_mean", "lss_offdiag", "gen_target_patched") if m in metric_names), None)
    images = pivot_heatmaps(done, main_metric, sweep_dir) if main_metric else []
    missing = missing_cells(sweep_dir, runs)

    lines = [f"# lsn_exp report: {sweep_dir.name}", "",
             f"{len(done)} complete cell(s); {len(missing)} missing.", "", "## Cells", "",
             *outputs.markdown_rows(header, rows), ""]
    if main_metric:
        lines += [f"## {main_metric} by model x factor (mean over languages)", ""]
        agg = defaultdict(list)
        for cell, row in zip(done, rows):
            value = row[header.index(main_metric)]
            if value is not None:
                agg[(cell.key[0], cell.key[2])].append(value)
        lines += outputs.markdown_rows(["model", "factor", main_metric, "n langs"],
                                [[m, f, sum(v) / len(v), len(v)] for (m, f), v in sorted(agg.items())])
        lines += ["", *(f"![{p.stem}]({p.name})" for p in images), ""]
    lines += lss_section(done, sweep_dir)
    lines += downstream_section(done, sweep_dir)
    lines += layer_section(done, sweep_dir)
    lines += compare_section(done, sweep_dir)
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
    webpage.write(path, f"lsn_exp report: {sweep_dir.name}")
    return path


def log_report_run(sweep_dir: Path, runs: list[SweepRun]) -> None:
    """One W&B run (job type ``report``) for the sweep: the cell table, every CSV and figure the report made.
    Its id comes from the sweep dir, so a re-made report updates the same run; the logger is the cells'."""
    from omegaconf import OmegaConf

    from lsn_exp.tracking import RunRecord, log_to_wandb

    logger = next((r.config.get("logger") for r in runs if r.results is not None and r.config.get("logger")), None)
    if not logger or logger.get("name") != "wandb":
        return
    run_dir = sweep_dir / ".report"
    run_dir.mkdir(exist_ok=True)
    tables = {f"report/{p.stem}": p for p in sorted(sweep_dir.glob("*.csv"))}
    images = {f"report/{p.stem}": p for p in sorted(sweep_dir.rglob("*.png")) if p.parent == sweep_dir
              or p.parent.name.startswith("downstream_")}
    record = RunRecord(run_dir=run_dir, config={"sweep": sweep_dir.name, "cells": len(runs)}, tables=tables,
                       images=images)
    digest = hashlib.sha256(str(sweep_dir.resolve()).encode()).hexdigest()[:16]
    log_to_wandb(record, OmegaConf.create(logger), group=sweep_dir.name, name=f"report-{sweep_dir.name}",
                 job_type="report", run_id=f"report-{digest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lsn_exp.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report as a W&B run")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"lsn_exp.report: error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    path = build_report(args.sweep_dir)
    print(path)
    print(path.with_suffix(".html"))
    if not args.no_wandb:
        log_report_run(args.sweep_dir, collect(args.sweep_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
