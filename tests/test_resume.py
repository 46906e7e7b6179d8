"""Resuming a sweep: a cell is skipped only for the same config, code and (factor=best / method=best) winner."""

from __future__ import annotations

import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

from lsn_exp import CONF_DIR, REPO_ROOT, resume
from lsn_exp.cache import CacheStore
from lsn_exp.factorsearch import BEST_FACTOR_KIND, search_key
from lsn_exp.tracking import RunRecord


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["model=tiny", *overrides])


def finished(run_dir, cfg, **results) -> None:
    """A cell's run dir as a completed job leaves it."""
    record = RunRecord.start(cfg, run_dir)
    record.results.update(results)
    record.save()


def store_winner(store: CacheStore, spec: dict, entry: dict) -> None:
    store.save(BEST_FACTOR_KIND, spec, {"mean_offdiag_lss": torch.tensor([0.5])}, {"name": "w", "entry": entry})


def test_the_code_version_follows_the_package_source_only(tmp_path):
    """A hash of lsn_exp's .py and task .yaml files: the same for an identical copy, new after any edit of one."""
    copies = [tmp_path / name / "lsn_exp" for name in ("a", "b", "c")]
    for copy in copies:
        shutil.copytree(REPO_ROOT / "lsn_exp", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copies[0].parent / "README.md").write_text("docs outside the package change nothing")
    with open(copies[1] / "metrics.py", "a") as f:
        f.write("\nFIX = 1\n")
    task_yaml = next(copies[2].glob("tasks/*/*.yaml"))
    task_yaml.write_text(task_yaml.read_text() + "\n# changed\n")
    versions = [resume.code_version(copy) for copy in copies]
    assert versions[0] == resume.code_version(REPO_ROOT / "lsn_exp")
    assert len(set(versions)) == 3


def test_a_completed_cell_is_skipped_for_the_same_code_and_recomputed_for_new_code(tmp_path):
    cfg = composed("lang=fr", "factor=2")
    assert resume.config_hash(cfg) == resume.config_hash(cfg, code=resume.code_version())
    old, new = resume.config_hash(cfg, code="before-the-fix"), resume.config_hash(cfg, code="after-the-fix")
    assert old != new
    finished(tmp_path / "cell", cfg, config_hash=old)
    assert resume.completed(tmp_path / "cell", old, tmp_path / "store")
    assert not resume.completed(tmp_path / "cell", new, tmp_path / "store")
    assert resume.run_id({"config_hash": old}) == f"lsn-{old}"  # W&B ids of other cells stay as they were


def test_a_best_cell_reruns_when_a_new_winner_is_stored(tmp_path):
    cfg = composed("lang=fr", "factor=best")
    store, spec, digest = CacheStore(tmp_path / "store"), {"model": "m", "search": 1}, resume.config_hash(cfg)
    store_winner(store, spec, {"factor": "pmax"})
    winners = {"fr": resume.winner(store.root, BEST_FACTOR_KIND, spec, "entry")}
    assert winners["fr"]["winner"] == {"factor": "pmax"}
    finished(tmp_path / "cell", cfg, config_hash=digest, winners=winners)
    assert resume.completed(tmp_path / "cell", digest, store.root)  # same everything: skipped
    assert resume.completed(tmp_path / "cell", digest, tmp_path / "empty")  # no search in this cache: it stands
    store_winner(store, spec, {"factor": 5})  # a new search found another winner
    assert not resume.completed(tmp_path / "cell", digest, store.root)
    moved = {"fr": resume.winner(store.root, BEST_FACTOR_KIND, spec, "entry")}
    ids = {resume.run_id({"config_hash": digest, "winners": w}) for w in (winners, moved)}
    assert len(ids) == 2 and f"lsn-{digest}" not in ids  # its W&B run is another run too


def test_the_job_records_the_winner_factor_best_resolved_to(tmp_path, tiny):
    from lsn_exp.job import JobContext
    from lsn_exp.settings import parse_job

    cfg = composed("lang=fr", "factor=best")
    store = CacheStore(tmp_path / "store")
    job = parse_job(cfg)
    store_winner(store, search_key(tiny.identity, "neurons-key", job.config["patch"], job.factor_search), {"factor": 3})
    ctx = JobContext(settings=job, run_dir=tmp_path, model_handle=tiny, store=store, neurons_key="neurons-key")
    assert ctx.intervention("fr").patch.describe().startswith("fr:lape:mul=3")
    assert ctx.winners["fr"]["kind"] == BEST_FACTOR_KIND and ctx.winners["fr"]["winner"] == {"factor": 3}
    with pytest.raises(Exception, match="no factor search matches.*run `python -m lsn_exp stage=factor_search "
                       "model=tiny`"):
        JobContext(settings=job, run_dir=tmp_path, model_handle=tiny, store=store, neurons_key="other",
                   overrides=("model=tiny", "factor=best")).intervention("fr")
