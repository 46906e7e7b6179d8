"""Every CSV, PNG and Markdown file a job or a report writes, from typed results (lsn_exp.results).

No torch and no lm-eval here (the report imports this module); figures go through lsn_exp.plots.
Each writer returns what it wrote, keyed by its W&B name where a job logs it.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lsn_exp import metrics, plots
from lsn_exp.results import DownstreamResult, LssCell, LssMatrix, cell_matrix
from lsn_exp.taskindex import TASK_FAMILIES


def write_csv(path: Path, header: list[str], rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def markdown_rows(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table: floats to 3 decimals, None as a dash."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(v) for v in row) + " |" for row in rows)]


def _fmt(value) -> str:
    return "" if value is None else f"{value:.6g}"


def pivot_heatmap(values: dict[tuple[str, str], float], title: str, path: Path) -> Path:
    """A report's language x factor heatmap of one headline metric."""
    langs, factors = sorted({k[0] for k in values}), sorted({k[1] for k in values})
    matrix = [[values.get((lang, f), float("nan")) for f in factors] for lang in langs]
    return plots.heatmap(matrix, langs, factors, title, path, xlabel="factor", ylabel="target language")


def by_layer_plot(curves: dict[str, list[float]], title: str, what: str, path: Path) -> Path:
    """A per-layer sweep's measure by layer (NaN where a layer has no result), one line per curve."""
    return plots.lines(curves, title, "layer", what, path)


# --- identification --------------------------------------------------------------------------------------

def neuron_tables(languages: list[str], per_layer: dict[str, list[list[int]]], overlap, out_dir: Path):
    """neurons_<set>_per_layer.csv (language x layer counts), the LAPE per-layer plot and overlap heatmap."""
    tables, images = {}, {}
    for name, rows in per_layer.items():
        header = ["lang", *[f"L{layer}" for layer in range(len(rows[0]))], "total"]
        tables[f"identify/neurons_{name}"] = write_csv(out_dir / f"neurons_{name}_per_layer.csv", header,
                                                       [[code, *row, sum(row)] for code, row in zip(languages, rows)])
    images["identify/lape_per_layer"] = plots.heatmap(
        per_layer["lape"], languages, [str(layer) for layer in range(len(per_layer["lape"][0]))],
        "LAPE neurons per language and layer", out_dir / "neurons_lape_per_layer.png", fmt=".0f", cmap="magma",
        xlabel="layer", ylabel="language")
    images["identify/lape_overlap"] = plots.heatmap(overlap, languages, languages, "LAPE neuron overlap (Jaccard)",
                                                    out_dir / "lape_overlap.png", fmt=".2f")
    return tables, images


GENERATION_FIELDS = ("source", "prompt", "unpatched", "unpatched_lang", "unpatched_repetition", "patched",
                     "patched_lang", "patched_repetition", "patched_nll_unpatched_model")


def generations_csv(path: Path, rows: list[list]) -> Path:
    """Each prompt's unpatched and patched continuation with its language label, repetition rate and NLL."""
    return write_csv(path, list(GENERATION_FIELDS), rows)


# --- LSS -------------------------------------------------------------------------------------------------

CELL_FIELDS = ("source", "target", "lss", "ci_low", "ci_high", "lss_paper", "lss_paper_ci_low", "lss_paper_ci_high",
               "n", "skipped", "wins", "wins_paper", "within_tol", "mean_shift", "outcomes", "outcomes_paper")


def cells_csv(cells: list[LssCell], path: Path) -> Path:
    return write_csv(path, list(CELL_FIELDS), [[getattr(c, k) for k in CELL_FIELDS] for c in cells])


def matrix_csv(path: Path, sources: list[str], targets: list[str], matrix: dict) -> Path:
    """``matrix[source][target]`` (None: not scored) as a source x target CSV."""
    return write_csv(path, ["source\\target", *targets],
                     [[s, *["" if matrix[s].get(t) is None else f"{matrix[s][t]:.4f}" for t in targets]]
                      for s in sources])


def matrix_heatmap(matrix: dict, sources: list[str], targets: list[str], title: str, path: Path) -> Path:
    """``matrix[source][target]`` (None: not scored) as a heatmap centred on 0.5, a random patch's LSS."""
    values = [[float("nan") if matrix[s].get(t) is None else matrix[s][t] for t in targets] for s in sources]
    return plots.heatmap(values, sources, targets, title, path, fmt=".2f", cmap="coolwarm", center=0.5,
                         xlabel="target (patched toward)", ylabel="source (prompt language)")


def lss_matrix_files(result: LssMatrix, out_dir: Path, title: str = "", prefix: str = "lss") -> tuple[dict, dict]:
    """The ``lss`` and ``lss_paper`` matrices (CSV + heatmap) and the cells CSV of a matrix result."""
    tables = {f"{prefix}/cells": cells_csv(list(result.cells), out_dir / f"{prefix}_cells.csv")}
    images = {}
    for suffix, key, mean, what in (("", "lss", result.mean_offdiag, "same-string facts skipped"),
                                    ("_paper", "lss_paper", result.mean_offdiag_paper,
                                     "the paper's rule and prompt format: shift > 0 of all facts")):
        stem, matrix = f"{prefix}_matrix{suffix}", result.matrix(key)
        tables[f"{prefix}/matrix{suffix}"] = matrix_csv(out_dir / f"{stem}.csv", result.sources, result.targets,
                                                        matrix)
        images[f"{prefix}/heatmap{suffix}"] = matrix_heatmap(
            matrix, result.sources, result.targets,
            f"{title or 'LSS'} ({what}; mean off-diag {mean:.3f}, n={result.n_facts})", out_dir / f"{stem}.png")
    return tables, images


def sweep_lss_matrices(cells: list[LssCell], stem: str, title: str, out_dir: Path) -> list[Path]:
    """A report's assembled ``lss`` and ``lss_paper`` matrices of one model x factor (CSV + heatmap each)."""
    sources, targets = sorted({c.source for c in cells}), sorted({c.target for c in cells})
    images = []
    for suffix, key in (("", "lss"), ("_paper", "lss_paper")):
        matrix = cell_matrix(cells, sources, targets, key)
        matrix_csv(out_dir / f"{stem}{suffix}.csv", sources, targets, matrix)
        images.append(matrix_heatmap(matrix, sources, targets, f"{key} {title}", out_dir / f"{stem}{suffix}.png"))
    return images


RANKING_FIELDS = ("rank", "name", "mean_offdiag_lss", "mean_offdiag_lss_paper", "min_cell", "patch", "sample",
                  "wall_time_s")


def ranking_csv(ranked: list[dict], out_dir: Path) -> Path:
    return write_csv(out_dir / "factor_ranking.csv", list(RANKING_FIELDS),
                     [[row.get(k) for k in RANKING_FIELDS] for row in ranked])


# --- method comparison ---------------------------------------------------------------------------------------

COMPARE_SHOWN = ("method", "target", "domain", "coefficient", "search_score", "final_score", "lss", "lss_paper", "n",
                 "steering_success", "lid_ceiling", "lid_agreement", "target_share", "ppl", "degenerate_share", "xcopa_self",
                 "xcopa_cross")
TEST_SHOWN = ("target", "domain", "method_a", "method_b", "n", "share_a", "share_b", "only_a", "only_b", "p", "q")


def share_text(row: dict, key: str) -> str:
    """"0.50 [0.36, 0.64]": a share and its 95% interval; "wide" where the half-width passes metrics.WIDE."""
    lo, hi = row.get(f"{key}_ci") or (None, None)
    if row.get(key) is None or lo is None:
        return "—" if row.get(key) is None else f"{row[key]:.2f}"
    wide = " wide" if metrics.half_width((lo, hi)) > metrics.WIDE else ""
    return f"{row[key]:.2f} [{lo:.2f}, {hi:.2f}]{wide}"


def compare_markdown(rows: list[dict], tests: list[dict]) -> list[str]:
    """The method table (shares with their intervals) and the paired tests, as markdown lines."""
    shares = ("steering_success", "target_share", "degenerate_share")
    table = [[share_text(row, k) if k in shares else row.get(k) for k in COMPARE_SHOWN] for row in rows]
    lines = [*markdown_rows(list(COMPARE_SHOWN), table), "",
             f"Shares: 95% Wilson intervals over the n prompts counted; \"wide\": half-width above {metrics.WIDE}. "
             "lid_ceiling: the share of real target-language text the identifier labels as the target (the best "
             "reachable success); lid_agreement: how often py3langid and lingua label the continuations alike.", ""]
    if tests:
        lines += ["Paired tests (same prompts): exact McNemar p; q = Benjamini-Hochberg over the pairs of one target "
                  "and domain. only_a / only_b: prompts only that method steers.", "",
                  *markdown_rows(list(TEST_SHOWN), [[t.get(k) for k in TEST_SHOWN] for t in tests])]
    return lines


def comparison_files(rows: list[dict], fields: tuple[str, ...], out_dir: Path, title: str,
                     tests: list[dict] | None = None, test_fields: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """compare.csv, compare_tests.csv, compare.md (one row per method x target x domain, then the paired tests) and
    compare_scatter.png (steering success vs the continuations' perplexity under the unpatched model)."""
    csv_path = write_csv(out_dir / "compare.csv", list(fields), [[row.get(k) for k in fields] for row in rows])
    tables = {"compare/table": csv_path}
    if tests:
        tables["compare/tests"] = write_csv(out_dir / "compare_tests.csv", list(test_fields),
                                            [[t.get(k) for k in test_fields] for t in tests])
    (out_dir / "compare.md").write_text("\n".join([f"# {title}", "", *compare_markdown(rows, tests or [])]) + "\n")
    points: dict[str, list] = {}
    for row in rows:
        if row.get("ppl") and row.get("domain") in (None, rows[0].get("domain")):
            points.setdefault(row["method"], []).append((row["ppl"], row["steering_success"], row["target"]))
    image = plots.scatter(points, f"{title}: steering vs fluency", "perplexity of the continuation (unpatched model)",
                          "steering success (target language, not degenerate)", out_dir / "compare_scatter.png")
    return tables, {"compare/scatter": image}


def search_curve_files(curve: list[dict], fields: tuple[str, ...], out_dir: Path, title: str) -> tuple[dict, dict]:
    """compare_search.csv (every search evaluation) and compare_search.png (score by coefficient, one panel per
    searched method, one line per target)."""
    table = write_csv(out_dir / "compare_search.csv", list(fields), [[row.get(k) for k in fields] for row in curve])
    panels: dict[str, dict[str, list]] = {}
    for row in curve:
        if row.get("coefficient") is not None:
            panels.setdefault(f"{row['method']} ({row['path']})", {}).setdefault(row["target"], []).append(
                (row["coefficient"], row["score"]))
    if not panels:
        return {"compare/search": table}, {}
    image = plots.curves(panels, f"{title}: coefficient search", "search score", out_dir / "compare_search.png")
    return {"compare/search": table}, {"compare/search_curves": image}


# --- downstream ------------------------------------------------------------------------------------------

TASK_FIELDS = ("task", "family", "lang", "self", "metric", "n", "value", "stderr", "base", "base_stderr", "delta",
               "delta_stderr")
MT_OUTPUT_FIELDS = ("task", "doc", "reference", "unpatched", "unpatched_lang", "patched", "patched_lang")
METRIC_FMT = {"acc": ".3f", "lang_share": ".2f", "chrf++": ".1f", "bleu": ".1f", "ll_per_token": ".3f", "ppl": ".1f",
              "bits_per_byte": ".3f"}


def task_rows(result: DownstreamResult) -> list[dict]:
    return [{"task": name, "family": t.family, "lang": t.lang, "self": t.self_language, "metric": metric, "n": t.n,
             **m.to_json()} for name, t in result.tasks.items() for metric, m in t.metrics.items()]


def downstream_tables(result: DownstreamResult, mt_rows: list[list], out_dir: Path) -> dict:
    """downstream_tasks.csv (one row per task and metric) and, with ``mt_rows`` (MT_OUTPUT_FIELDS),
    downstream_mt_outputs.csv (every translation, unpatched and patched, with its language label)."""
    rows = [[row[k] for k in TASK_FIELDS] for row in task_rows(result)]
    tables = {"downstream/tasks": write_csv(out_dir / "downstream_tasks.csv", list(TASK_FIELDS), rows)}
    if mt_rows:
        tables["downstream/mt_outputs"] = write_csv(out_dir / "downstream_mt_outputs.csv", list(MT_OUTPUT_FIELDS),
                                                    mt_rows)
    return tables


def _by_target(results: list[DownstreamResult]) -> dict[str, DownstreamResult]:
    from lsn_exp.data import LANG_ORDER
    from lsn_exp.errors import UserError

    by_target: dict[str, DownstreamResult] = {}
    for result in (r for r in results if r.target is not None):
        if result.target in by_target:
            raise UserError(f"two results patch toward {result.target}: "
                            "build matrices from one factor's jobs at a time")
        by_target[result.target] = result
    order = [c for c in LANG_ORDER if c in by_target] + sorted(c for c in by_target if c not in LANG_ORDER)
    return {code: by_target[code] for code in order}


def downstream_matrices(results: list[DownstreamResult], out_dir: Path, title: str = "") -> dict:
    """Matrices over a sweep: rows = task languages, columns = patched languages, cells = deltas.

    ``results``: one patch per target language (pass one factor's jobs). Writes, per family and metric,
    downstream_<family>_<metric>.csv and .png, plus downstream_self_cross.csv. Returns ``matrices`` (key ->
    rows, cols, values), ``tables`` and ``images`` (W&B key -> path).
    """
    from lsn_exp.data import LANG_ORDER

    by_target = _by_target(results)
    cols = list(by_target)
    deltas: dict[tuple[str, str], dict[tuple[str, str], float | None]] = {}
    for col, result in by_target.items():
        for task in result.tasks.values():
            for metric, m in task.metrics.items():
                deltas.setdefault((task.family, metric), {})[(task.lang, col)] = m.delta
    matrices, tables, images = {}, {}, {}
    order = {name: i for i, name in enumerate(TASK_FAMILIES)}  # ours first, then lm-eval tasks by name
    for (family, metric), values in sorted(deltas.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0])):
        rows = [r for r in LANG_ORDER if any((r, c) in values for c in cols)]
        grid = [[values.get((r, c)) for c in cols] for r in rows]
        key = f"{family}_{metric.replace('++', 'pp').replace('+', 'p')}"
        matrices[f"{family}/{metric}"] = {"rows": rows, "cols": cols, "values": grid}
        tables[f"downstream/{key}/matrix"] = write_csv(out_dir / f"downstream_{key}.csv", ["task_lang\\patched", *cols],
                                                       [[r, *map(_fmt, row)] for r, row in zip(rows, grid)])
        images[f"downstream/{key}/heatmap"] = plots.heatmap(
            [[float("nan") if v is None else v for v in row] for row in grid], rows, cols,
            f"{title + ': ' if title else ''}Δ {family} {metric}", out_dir / f"downstream_{key}.png",
            fmt=METRIC_FMT.get(metric, ".2f"), cmap="coolwarm", center=0.0, xlabel="patched language",
            ylabel="task language")
    rows = [[col, family, metric, _fmt(s.get("self")), _fmt(s.get("self_stderr")), _fmt(s.get("cross")), s["n_cross"]]
            for col, result in by_target.items() for family, metrics in result.summary().items()
            for metric, s in metrics.items()]
    tables["downstream/self_cross"] = write_csv(
        out_dir / "downstream_self_cross.csv",
        ["patched", "family", "metric", "self_delta", "self_stderr", "cross_delta", "n_cross"], rows)
    return {"matrices": matrices, "tables": tables, "images": images}


def _pm(value, stderr, fmt: str, sign: bool = False) -> str:
    if value is None:
        return "—"
    text = format(value, ("+" if sign else "") + fmt)
    return text if stderr is None else f"{text} ± {format(stderr, fmt)}"


def downstream_markdown(result: DownstreamResult) -> str:
    """A job's result as two markdown tables: every task and metric, then self vs cross per family."""
    s = result.settings
    lines = [f"Patched toward **{result.target}** ({result.patch.patch if result.patch else 'unpatched'}); "
             f"limit {s['limit']} (overrides {s['limits'] or 'none'}), MT prompt {s['mt_prompt']}, "
             f"FLORES {s['flores_split']}.", "",
             "| family | lang | metric | n | unpatched | patched | Δ (± paired se) |",
             "|---|---|---|---|---|---|---|"]
    for row in task_rows(result):
        f = METRIC_FMT.get(row["metric"], ".3f")
        lang = f"**{row['lang']}**" if row["self"] else row["lang"]
        lines.append(f"| {row['family']} | {lang} | {row['metric']} | {row['n']} "
                     f"| {_pm(row['base'], row['base_stderr'], f)} | {_pm(row['value'], row['stderr'], f)} "
                     f"| {_pm(row['delta'], row['delta_stderr'], f, sign=True)} |")
    lines += ["", "| family | metric | self Δ (task lang = patched) | mean cross Δ (other langs) | n cross |",
              "|---|---|---|---|---|"]
    for family, metrics in result.summary().items():
        for metric, entry in metrics.items():
            f = METRIC_FMT.get(metric, ".3f")
            self_ = "—" if entry.get("self") is None else _pm(entry["self"], entry.get("self_stderr"), f, sign=True)
            cross = "—" if entry.get("cross") is None else format(entry["cross"], "+" + f)
            lines.append(f"| {family} | {metric} | {self_} | {cross} | {entry['n_cross']} |")
    lines += [line for family, reason in result.skipped.items() for line in ("", f"{family}: {reason}")]
    return "\n".join(lines) + "\n"
