"""Sweeps: a 2 x 2 multirun on a tiny model, the report, and resuming a sweep cell by cell."""

from __future__ import annotations

import json

import pytest

from lsn_exp.report import build_report
from conftest import run_cli

SMALL = ["model=tiny", "logger=none", "identify.languages=[en,fr,id]", "identify.max_tokens=1500",
         "lss.n_facts=4", "lss.sources=[en,fr,id]", "lss.bootstrap=50"]
GRID = ["lang=id,fr", "factor=2,pmax"]
pytestmark = pytest.mark.slow  # sweeps of real jobs (about 3 minutes in all): in `make test-slow`


def attempts(cell) -> list[str]:
    return [line.split(" ", 1)[1] for line in (cell / "attempts.log").read_text().splitlines()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "s"
    result = run_cli("-m", *GRID, *SMALL, f"hydra.sweep.dir={sweep_dir}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def test_multirun_writes_four_cells_and_a_report_with_heatmaps(sweep):
    cells = {}
    for num in range(4):
        payload = json.loads((sweep / str(num) / "results.json").read_text())
        cells[(payload["config"]["lang"]["code"], str(payload["config"]["factor"]))] = payload["results"]
    assert set(cells) == {("id", "2"), ("id", "pmax"), ("fr", "2"), ("fr", "pmax")}
    assert all(0.0 <= r["lss"]["mean"] <= 1.0 for r in cells.values())
    report = build_report(sweep).read_text()
    assert "4 complete cell(s); 0 missing." in report
    page = (sweep / "report.html").read_text()  # self-contained: every figure of report.md embedded
    figures = [line for line in report.splitlines() if line.startswith("![")]
    assert figures and page.count("data:image/png;base64,") == len(figures)
    assert page.count("<table>") == report.count("\n|---") and "missing figure" not in page
    assert "## lss_mean by model x factor" in report
    assert (sweep / "tiny_lss_mean.png").stat().st_size > 1000
    assert (sweep / "report_cells.csv").read_text().count("\n") == 5
    # LSS by model x factor: the mean over each factor's (source, target) cells, with its CI and matrix
    for factor in ("2", "pmax"):
        values = [c["lss"] for (lang, f), r in cells.items() if f == factor for c in r["lss"]["cells"] if c["n"]]
        paper = [c["lss_paper"] for (lang, f), r in cells.items() if f == factor for c in r["lss"]["cells"] if c["n"]]
        assert f"| tiny | {factor} | {sum(values) / len(values):.3f} | [" in report
        assert f" | {sum(paper) / len(paper):.3f} | [" in report  # the paper's count beside it
        assert (sweep / f"lss_matrix_tiny_{factor}_paper.csv").exists()
        matrix = (sweep / f"lss_matrix_tiny_{factor}.csv").read_text().splitlines()
        assert matrix[0] == "source\\target,fr,id" and len(matrix) == 4  # sources en, fr, id
        assert (sweep / f"lss_matrix_tiny_{factor}.png").stat().st_size > 1000


def test_rerun_recomputes_only_the_cell_whose_results_were_deleted(sweep):
    (sweep / "2" / "results.json").unlink()
    assert "1 missing" in build_report(sweep).read_text()
    result = run_cli("-m", *GRID, *SMALL, f"hydra.sweep.dir={sweep}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for num in range(4):
        history = attempts(sweep / str(num))
        if num == 2:
            assert history == ["started", "completed", "started", "completed"]
        else:
            assert history == ["started", "completed", "skipped: complete results exist for this config"]
    assert "0 missing" in build_report(sweep).read_text()


def test_report_cli_on_a_missing_dir_is_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lsn_exp.report", str(tmp_path / "nope")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "is not a directory" in result.stderr


def test_a_results_file_of_another_schema_is_listed_as_missing_not_misread(sweep, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(sweep, old)
    cell = old / "0" / "results.json"
    payload = json.loads(cell.read_text())
    del payload["schema_version"]  # results.json as written before the typed results
    cell.write_text(json.dumps(payload))
    report = build_report(old).read_text()
    assert "3 complete cell(s); 1 missing." in report
    assert "has results schema None, this report reads 1" in capsys.readouterr().err


def _cell(outcomes: str, source: str = "en", target: str = "fr"):
    """An LssCell whose per-fact outcomes are ``outcomes`` (1 win, 0 no win, s skipped)."""
    from lsn_exp.metrics import lss_cell

    shift = [{"1": 1.0, "0": -1.0, "s": float("nan")}[ch] for ch in outcomes]
    cell = lss_cell(source, target, shift, tol=1e-3, n_boot=0, seed=0)
    assert cell.outcomes == outcomes
    return cell


def test_headline_names_each_stage_number():
    from lsn_exp.job import headline
    from lsn_exp.results import DownstreamResult, LssResult, MetricDelta, PatchSummary, TaskScore

    patch = PatchSummary(patch="id:lape:mul=2", layers=[0, 1], neurons=42, neurons_per_layer=[20, 22],
                         others_neurons=0, weight_edit_layers=2, hook_layers=0)
    lss = LssResult(target="id", patch=patch, cells=(_cell("1100s"),), tol=1e-3, n_facts=5,
                    fact_ids=[f"P17:{i}" for i in range(5)], requests=8, wall_time_s=1.0)
    assert (lss.mean, lss.mean_paper) == (0.5, 0.4)

    def task(family, lang, self_language, delta):
        acc = MetricDelta(value=0.5 + delta, stderr=0.01, base=0.5, base_stderr=0.01, delta=delta, delta_stderr=0.01)
        return TaskScore(family=family, lang=lang, n=100, self_language=self_language, metrics={"acc": acc},
                         unpatched_cached=True)

    downstream = DownstreamResult(target="id", patch=patch, tasks={
        "xcopa_local_id": task("xcopa", "id", True, 0.07), "xcopa_local_it": task("xcopa", "it", False, -0.003),
        "xwinograd_local_fr": task("xwinograd", "fr", False, -0.034)}, skipped={}, settings={}, wall_time_s=3.0,
        data_root="")
    summary = downstream.summary()
    assert summary["xcopa"]["acc"]["self"] == 0.07 and summary["xwinograd"]["acc"]["self"] is None
    line = headline({"identify": {"lape_neurons": {"id": 30, "ms": 12}}, "lss": lss, "downstream": downstream,
                     "wall_time_s": 12.5})
    assert line == ("LAPE neurons=42 | mean LSS 0.500 (paper count 0.400) | xcopa acc Δ self +0.070 cross -0.003 | "
                    "xwinograd acc Δ self — cross -0.034 | 12.5 s")


def test_report_ci_resamples_facts_shared_by_all_cells():
    """Cells that share their facts are not independent: ten cells with the same outcomes carry the
    uncertainty of one cell's ten facts, which a bootstrap over cells would report as a zero-width CI."""
    from lsn_exp.metrics import fact_bootstrap

    same = [_cell("1100110010") for _ in range(10)]
    ci = fact_bootstrap(same, n_boot=2000)
    assert ci["lss"][0] < 0.3 and ci["lss"][1] > 0.7  # one cell's 10 facts: wide
    independent = [_cell("".join("1" if (i + j) % 2 else "0" for j in range(10))) for i in range(10)]
    narrow = fact_bootstrap(independent, n_boot=2000)
    assert narrow["lss"] == (0.5, 0.5)  # every resample of facts keeps the mean over these cells at 0.5
    skipped = fact_bootstrap([_cell("1s1s1s0s00")], n_boot=2000)
    assert skipped["lss_paper"][1] <= skipped["lss"][1]  # the paper count puts skipped facts in the denominator
    assert fact_bootstrap([_cell("10"), _cell("101")]) is None  # no common sample: no CI


def test_per_layer_preset_runs_one_cell_per_layer_and_the_report_plots_by_layer(tmp_path):
    dry = run_cli("-m", "+experiment=per_layer", "dry_run=true", "logger=none", f"hydra.sweep.dir={tmp_path / 'dry'}",
                  timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert len(list((tmp_path / "dry").glob("*/dry_run.txt"))) == 18  # Gemma-3-270M's layers
    sweep_dir = tmp_path / "real"
    result = run_cli("-m", "+experiment=per_layer", "layer=range(0,2)", "lang=fr", "generate.n_prompts=2",
                     "generate.max_new_tokens=4", *SMALL, f"hydra.sweep.dir={sweep_dir}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for layer in (0, 1):
        cfg = json.loads((sweep_dir / str(layer) / "results.json").read_text())["config"]
        assert cfg["patch"]["layers"] == layer == cfg["steer"]["layers"]
    report = build_report(sweep_dir).read_text()
    assert "## By layer: tiny" in report
    assert (sweep_dir / "report_by_layer_tiny_lss_mean.png").exists()
    assert (sweep_dir / "report_by_layer_tiny_gen_steering_success.png").exists()
