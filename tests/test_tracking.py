"""Run records: atomic results, provenance, and W&B that never fails a job."""

from __future__ import annotations

import json
import warnings

import pytest
from omegaconf import OmegaConf

from lsn_exp.tracking import RunRecord, flatten, log_to_wandb, provenance, write_json_atomic


def test_atomic_write_leaves_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": 1})

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"bad": Boom()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_provenance_names_commit_packages_and_data_hashes(tmp_path):
    data_file = tmp_path / "x.txt"
    data_file.write_text("hello\n")
    prov = provenance({"id": "m"}, [data_file])
    assert len(prov["git"]["commit"]) == 40
    assert prov["packages"]["torch"].startswith("2.13.0")
    assert prov["data_files"][str(data_file)] == \
        "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def test_flatten_makes_dotted_keys():
    assert flatten({"model": {"name": "x", "arch": {"h": 1}}, "factor": 5}) == \
        {"model.name": "x", "model.arch.h": 1, "factor": 5}


def _record(tmp_path):
    cfg = OmegaConf.create({"model": {"name": "tiny"}, "lang": {"code": "id"}, "factor": 5})
    record = RunRecord.start(cfg, tmp_path)
    record.results = {"lss": {"mean": 0.5}}
    record.save()
    return record


def test_wandb_failure_is_a_warning_and_results_survive(tmp_path):
    record = _record(tmp_path)
    bad_logger = OmegaConf.create({"name": "wandb", "project": "lsn-exp", "entity": None, "mode": "bogus",
                                   "tags": []})
    with pytest.warns(UserWarning, match="W&B logging failed"):
        log_to_wandb(record, bad_logger, group="g", name="n", job_type="run")
    assert json.loads((tmp_path / "results.json").read_text())["results"]["lss"]["mean"] == 0.5


def test_wandb_offline_run_is_written_in_the_run_dir(tmp_path):
    record = _record(tmp_path)
    logger = OmegaConf.create({"name": "wandb", "project": "lsn-exp", "entity": None, "mode": "offline",
                               "tags": ["test"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        log_to_wandb(record, logger, group="g", name="tiny-id-5", job_type="run")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
