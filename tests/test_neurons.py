"""Portable neuron sets: export -> import -> identify.from gives the same LSS with no recording; wrong model or
format is one line; every job logs its neuron set as a W&B artifact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, run_cli
from test_tracking import read_offline_run

TINY = ("model=tiny", "identify.languages=[en,fr,ja]", "identify.max_tokens=300", "lss.sources=[en,fr,ja]",
        "lss.n_facts=4", "lss.bootstrap=0", "lang=fr")


def neurons_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lsn_exp.neurons", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def results(run_dir):
    return json.loads((run_dir / "results.json").read_text())["results"]


@pytest.mark.slow  # a sweep of real jobs (about a minute): in `make test-slow`
def test_export_import_and_identify_from_give_the_same_lss_without_recording(tmp_path):
    made = run_cli("stage=lss", *TINY, "logger=wandb", f"hydra.run.dir={tmp_path}/made", timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    key = results(tmp_path / "made")["identify"]["neurons_key"]
    logged = read_offline_run(tmp_path / "made")["artifacts"]
    neuron_sets = [a for a in logged if a["type"] == "neurons"]
    assert len(neuron_sets) == 1 and neuron_sets[0]["files"] == ["card.json", "neurons.safetensors"]

    folder = tmp_path / "shared_neurons"
    exported = neurons_cli("export", str(folder), "--model", "tiny", "--key", key)
    assert exported.returncode == 0, exported.stderr
    card = json.loads((folder / "card.json").read_text())
    assert card["format"] == "lsn_exp.neurons/1" and card["languages"] == ["en", "fr", "ja"]
    assert card["model"]["id"] == "tiny-llama" and set(card["corpus"]) == {"en", "fr", "ja"}
    assert all(v.startswith("sha256:") for v in card["corpus"].values())
    assert len(card["counts_per_layer"]["lape"]["fr"]) == 4 and card["selection"]["top_rate"] == 0.01
    shown = neurons_cli("show", str(folder))
    assert shown.returncode == 0 and "fr:" in shown.stdout and "LAPE neurons" in shown.stdout
    imported = neurons_cli("import", str(folder), "--model", "tiny", "--cache-dir", str(tmp_path / "cache"))
    assert imported.returncode == 0 and (tmp_path / "cache" / "artifacts" / "tiny" / "neurons_imported").is_dir()

    used = run_cli("stage=lss", *TINY, f"identify.from={folder}", "logger=none", f"hydra.run.dir={tmp_path}/used",
                   timeout=600)
    assert used.returncode == 0, used.stderr[-3000:]
    assert "record en" not in used.stderr + used.stdout  # no recording step
    before, after = results(tmp_path / "made"), results(tmp_path / "used")
    assert after["identify"]["recorded"] is False and after["identify"]["from"] == str(folder)
    assert [c["outcomes"] for c in after["lss"]["cells"]] == [c["outcomes"] for c in before["lss"]["cells"]]
    assert after["lss"]["mean"] == before["lss"]["mean"]


@pytest.mark.slow  # two CLI jobs (about 30 s): kept out of `make test`'s 10 minutes, run by `make test-slow`
def test_another_models_or_formats_neurons_are_refused_in_one_line(tmp_path):
    made = run_cli("stage=identify", *TINY, "logger=none", f"hydra.run.dir={tmp_path}/made", timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    folder = tmp_path / "n"
    key = results(tmp_path / "made")["identify"]["neurons_key"]
    assert neurons_cli("export", str(folder), "--model", "tiny", "--key", key).returncode == 0
    other = run_cli("stage=lss", *TINY, "model.seed=1", f"identify.from={folder}", "logger=none",
                    f"hydra.run.dir={tmp_path}/other", timeout=600)
    assert other.returncode == 2 and "holds neurons of tiny-llama" in other.stderr
    assert "neurons are only meaningful in the model they were found in" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and "Traceback" not in other.stderr
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "format": "lsn_exp.neurons/0"}))
    old = neurons_cli("show", str(folder))
    assert old.returncode == 2 and "this lsn_exp reads 'lsn_exp.neurons/1'" in old.stderr
