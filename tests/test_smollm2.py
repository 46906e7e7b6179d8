"""The second real model, SmolLM2-135M (Llama family, a tokenizer that adds no BOS), end to end on the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_smollm2_identifies_neurons_after_an_eos_prefix_and_scores_a_two_target_lss(tmp_path):
    # A short identification (the smallest that still selects per-language neurons), then the 15 x 2 matrix.
    result = run_cli("model=smollm2_135m", "stage=lss_matrix", "identify.max_tokens=3000", "lss.n_facts=6",
                     "lss.targets=[fr,ja]", "lss.bootstrap=50", "logger=none", f"hydra.run.dir={tmp_path}",
                     timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    results = payload["results"]
    assert payload["provenance"]["model"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    lape = results["identify"]["lape_neurons"]
    assert len(lape) == 18 and sum(lape.values()) > 0
    matrix = results["lss_matrix"]
    assert matrix["targets"] == ["ja", "fr"] and len(matrix["sources"]) == 15  # the LSS languages' order
    assert matrix["matrix"]["fr"]["fr"] is None and matrix["matrix"]["ja"]["ja"] is None
    cells = matrix["per_target"]
    assert all(0 <= cells[t]["mean_lss"] <= 1 and 0 <= cells[t]["mean_lss_paper"] <= 1 for t in ("fr", "ja"))
    assert 0 <= matrix["mean_offdiag_paper"] <= matrix["mean_offdiag"] <= 1
    # SmolLM2's tokenizer adds no BOS: every sentence was recorded after its EOS, left out of the counts
    assert results["identify"]["prefix"] == {"token_id": 2, "token": "<|im_end|>", "source": "eos"}
    assert results["identify"]["max_tokens"] == 3000
    assert (tmp_path / "lss_matrix.png").exists() and (tmp_path / "lss_matrix_paper.csv").exists()
