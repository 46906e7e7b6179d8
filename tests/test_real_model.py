"""The default job end to end on the real Gemma-3-270M (few facts), W&B offline."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_default_job_on_gemma_writes_results_plots_and_an_offline_wandb_run(tmp_path):
    result = run_cli("lang=zh", "lss.n_facts=5", "lss.sources=[en,ja,zh]", "lss.bootstrap=100",
                     f"hydra.run.dir={tmp_path}", timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    results = payload["results"]
    assert results["stages_done"] == ["load_model", "identify_neurons", "generate_demo", "lss_scores"]
    assert set(results["lss"]["lss"]) == {"en", "ja"} and 0 <= results["lss"]["mean"] <= 1
    assert results["identify"]["lape_neurons"]["zh"] > 0
    assert payload["provenance"]["model"]["gguf_sha256"]
    assert any("flores200/dev/zho_Hans.txt" in path for path in payload["provenance"]["data_files"])
    assert any("mlama" in path for path in payload["provenance"]["data_files"])
    for name in ("lape_overlap.png", "neurons_lape_per_layer.csv", "generations.csv", "lss_zh_cells.csv"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "wandb").glob("offline-run-*"))
