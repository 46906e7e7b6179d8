"""Run records: atomic results, provenance, and W&B that never fails a job."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
import zlib
from importlib.metadata import version
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lsn_exp.files import write_json_atomic
from lsn_exp.tracking import RunRecord, flatten, log_to_wandb, provenance


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
    """Provenance records the commit, the installed package versions and each data file's sha256."""
    data_file = tmp_path / "x.txt"
    data_file.write_text("hello\n")
    prov = provenance({"id": "m"}, [data_file])
    assert len(prov["git"]["commit"]) == 40
    assert prov["packages"]["torch"] == version("torch")
    assert prov["data_files"][str(data_file)] == \
        "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def test_flatten_makes_dotted_keys():
    assert flatten({"model": {"name": "x", "arch": {"h": 1}}, "factor": 5}) == \
        {"model.name": "x", "model.arch.h": 1, "factor": 5}


def _record(tmp_path):
    cfg = OmegaConf.create({"model": {"name": "tiny"}, "lang": {"code": "id"}, "factor": 5})
    record = RunRecord.start(cfg, tmp_path)
    record.results = {"generate": {"steering_success": 0.5, "target_share_unpatched": 0.0,
                                   "target_share_patched": 0.75}}
    record.save()
    return record


def test_wandb_failure_is_a_warning_and_results_survive(tmp_path):
    record = _record(tmp_path)
    bad_logger = OmegaConf.create({"name": "wandb", "project": "lsn-exp", "entity": None, "mode": "bogus",
                                   "tags": []})
    with pytest.warns(UserWarning, match="W&B logging failed"):
        log_to_wandb(record, bad_logger, group="g", name="n", job_type="run")
    assert json.loads((tmp_path / "results.json").read_text())["results"]["generate"]["steering_success"] == 0.5


def read_offline_run(run_dir: Path) -> dict:
    """Decode ``run_dir/wandb/offline-run-*/run-*.wandb``: {"config", "summary", "run", "history_keys"}.

    wandb 0.31 ships no Python reader (sdk/internal/datastore.py is gone; wandb-core writes the file), so
    this reads its LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each
    <crc32 (seeded with the type byte), length, type (1 full, 2 first, 3 middle, 4 last)> + data; the
    joined data of a full/first..last run is one serialised ``wandb_internal_pb2.Record``. Config arrives
    in the ``run`` record (and any later ``config`` records), values JSON-encoded; ``history_keys`` are the
    top-level keys passed to ``run.log``.
    """
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return read_run_file(path)


def read_run_file(path: Path) -> dict:
    """One ``run-<id>.wandb`` file, decoded as read_offline_run describes."""
    from google.protobuf.json_format import MessageToDict
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    assert struct.unpack("<4sHB", buf[:7]) == (b":W&B", 0xBEE1, 0)
    out = {"config": {}, "summary": {}, "run": {}, "history_keys": set(), "artifacts": []}
    pos, pending = 7, b""

    def key(item):
        return item.key or ".".join(item.nested_key)

    def apply(target, update):
        for item in update.update:
            target[key(item)] = json.loads(item.value_json)
        for item in update.remove:
            target.pop(key(item), None)

    while pos + 7 <= len(buf):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        chunk = buf[pos + 7:pos + 7 + length]
        pos += 7 + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {pos} in {path}"
        pending += chunk
        if kind not in (1, 4):
            continue
        rec, pending = pb.Record.FromString(pending), b""
        which = rec.WhichOneof("record_type")
        if which == "run":
            out["run"] = MessageToDict(rec.run, preserving_proto_field_name=True)
            apply(out["config"], rec.run.config)
        elif which == "config":
            apply(out["config"], rec.config)
        elif which == "summary":
            apply(out["summary"], rec.summary)
        elif which == "artifact":
            out["artifacts"].append({"type": rec.artifact.type, "name": rec.artifact.name,
                                     "files": sorted(c.path for c in rec.artifact.manifest.contents)})
        elif which == "history":
            out["history_keys"] |= {item.key or item.nested_key[0] for item in rec.history.item}
    return out


def test_wandb_offline_run_is_written_in_the_run_dir(tmp_path):
    """An offline W&B run lands in the run dir with the flattened config, summary and run identity."""
    record = _record(tmp_path)
    logger = OmegaConf.create({"name": "wandb", "project": "lsn-exp", "entity": None, "mode": "offline",
                               "tags": ["test"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        log_to_wandb(record, logger, group="g", name="tiny-id-5", job_type="run")
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    run = read_offline_run(tmp_path)
    assert {k: run["config"].get(k) for k in ("model.name", "lang.code", "factor")} == \
        {"model.name": "tiny", "lang.code": "id", "factor": 5}
    assert run["summary"]["generate/steering_success"] == 0.5
    assert (run["run"]["run_group"], run["run"]["job_type"], run["run"]["display_name"]) == \
        ("g", "run", "tiny-id-5")
    assert run["run"]["project"] == "lsn-exp" and run["run"]["tags"] == ["test"]
    assert run["history_keys"] == set()  # scalars go to the summary only; no images or tables here


@pytest.mark.slow  # a sweep of real jobs (about a minute): in `make test-slow`
def test_a_sweep_run_twice_and_a_resumed_cell_leave_one_wandb_run_per_cell(tmp_path):
    """Run ids come from the config hash: a sweep killed (SIGKILL) after its first cell, resumed, then run again
    leaves exactly one W&B run id per cell; a cell re-run after its results were lost writes a second file under
    the same id, which `wandb sync` resumes."""
    import os
    import signal
    import time

    from conftest import REPO_ROOT, run_cli

    sweep = ("-m", "model=tiny", "lang=fr,ja", "factor=2,pmax", "stage=generate", "generate.n_prompts=1",
             "generate.max_new_tokens=2", "generate.sources=[en]", "identify.languages=[en,fr,ja]",
             "identify.max_tokens=300", "logger=wandb", f"hydra.sweep.dir={tmp_path}")
    job = subprocess.Popen([sys.executable, "-m", "lsn_exp", *sweep], cwd=REPO_ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (tmp_path / "0" / "results.json").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # mid-sweep: cell 0 done, cell 1 somewhere in its job
    job.wait()
    assert not (tmp_path / "3" / "results.json").exists(), "the sweep finished before it could be killed"
    for attempt in range(2):  # resume the killed sweep, then run the finished one again
        result = run_cli(*sweep, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "3" / "results.json").unlink()  # a cell whose results were lost: it runs again
    result = run_cli(*sweep, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(tmp_path.glob("*/wandb/offline-run-*/run-*.wandb"))
    ids = {path.name[len("run-"):-len(".wandb")] for path in files}
    per_cell = {n: sorted((tmp_path / str(n)).glob("wandb/offline-run-*/run-*.wandb")) for n in range(4)}
    assert len(ids) == 4 and all(per_cell.values())  # one id per cell, however often it ran
    assert len(per_cell[3]) == 2 and per_cell[3][0].name == per_cell[3][1].name  # re-run: the same id
    runs = {str(n): read_run_file(paths[-1]) for n, paths in per_cell.items()}  # each cell's last, complete file
    for cell, run in runs.items():
        config = run["config"]
        assert {"model", "lang", "factor", "method", "stage"} <= set(config)
        assert (config["model"], config["method"], config["stage"]) == ("tiny", "neurons", "generate")
        assert config["lang"] == config["lang.code"] and config["lang"] in ("fr", "ja")
        assert 0 <= run["summary"]["generate/steering_success"] <= 1
        assert "identify/lape_union" in run["summary"] and "generate/continuations" in run["history_keys"]
        assert run["run"]["run_id"] == "lsn-" + json.loads((tmp_path / cell / "results.json").read_text())[
            "results"]["config_hash"]
    report = subprocess.run([sys.executable, "-m", "lsn_exp.report", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)  # one summary run of job type report, beside the cells
    assert report.returncode == 0, report.stderr[-3000:]
    summary = read_offline_run(tmp_path / ".report")
    assert summary["run"]["job_type"] == "report" and "report/report_cells" in summary["history_keys"]
