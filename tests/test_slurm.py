"""Sweeps through hydra-submitit-launcher: submitit_local, and a real single-node SLURM.

The SLURM test brings the cluster up with scripts/slurm_local.sh (it installs slurm-wlm and
munge when missing, needs root or passwordless sudo) and is skipped, with the script's error
as the reason, only when the cluster cannot start. It reads LSN_CACHE from the environment:
the tiny model reuses the converted Gemma-3 tokenizer cached there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
# Small identify/LSS settings: the test is about launching, not about the science.
GRID = ["model=tiny", "lang=id,fr", "factor=2,pmax", "logger=none", "identify.languages=[en,fr,id]",
        "identify.max_tokens=1500", "lss.n_facts=4", "lss.sources=[en,fr,id]", "lss.bootstrap=50"]
CELLS = {("id", "2"), ("id", "pmax"), ("fr", "2"), ("fr", "pmax")}
SWEEP_TIMEOUT_S = int(os.environ.get("LSN_TEST_SLURM_TIMEOUT", "300"))


def _env() -> dict[str, str]:
    """The environment of the sweep; sbatch exports it to the jobs (--export=ALL by default)."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _tail(text: str | bytes | None, n: int = 25) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-n:])


def _multirun(sweep_dir: Path, *overrides: str, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lsn_exp", "-m", *GRID, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"sweep did not finish in {timeout}s\n{_tail(err.stderr)}\n{_submitit_logs(sweep_dir)}")


def _submitit_logs(sweep_dir: Path) -> str:
    """The jobs' own stderr (what a SLURM job printed), for failure messages."""
    logs = sorted((sweep_dir / ".submitit").glob("*/*_log.err"))
    return "\n".join(f"---- {p}\n{_tail(p.read_text(errors='replace'), 15)}" for p in logs)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running single-node SLURM (partition `debug`); torn down after the module unless it was
    already up before (then it is left as found)."""
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("SLURM cannot start: scripts/slurm_local.sh needs Linux with bash")
    was_up = _script("status", timeout=60).returncode == 0
    try:
        up = _script("up")
    except subprocess.TimeoutExpired as err:
        _script("down", timeout=120)
        pytest.skip(f"SLURM cannot start: slurm_local.sh up timed out\n{_tail(err.stderr)}")
    if up.returncode != 0:
        _script("down", timeout=120)
        pytest.skip(f"SLURM cannot start (slurm_local.sh up exited {up.returncode}):\n{_tail(up.stderr)}")
    yield up.stdout.strip().splitlines()[-1]
    if not was_up:
        _script("down", timeout=120)


@pytest.mark.slow
def test_slurm_multirun_2x2(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(
        sweep_dir,
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        timeout=SWEEP_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{_tail(proc.stderr, 40)}\n{_submitit_logs(sweep_dir)}"
    # the cells ran as tasks of one SLURM array job: .submitit/<jobid>_<task>/
    array_dirs = [p for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    assert len(array_dirs) == 4, sorted(p.name for p in array_dirs)
    submission = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --partition=debug" in submission and "#SBATCH --array=0-3" in submission
    dirs = _job_dirs(sweep_dir)
    assert len(dirs) == 4, [p.name for p in dirs]
    cells = set()
    for job_dir in dirs:
        results = job_dir / "results.json"
        assert results.is_file(), f"{job_dir} has no results.json\n{_submitit_logs(sweep_dir)}"
        cfg = json.loads(results.read_text())["config"]
        cells.add((cfg["lang"]["code"], str(cfg["factor"])))
    assert cells == CELLS


@pytest.mark.slow  # a submitit sweep of four processes (about 12 s)
def test_submitit_local_dry_run_2x2(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(sweep_dir, "hydra/launcher=submitit_local", "dry_run=true", timeout=300)
    assert proc.returncode == 0, f"{_tail(proc.stderr, 40)}\n{_submitit_logs(sweep_dir)}"
    dirs = _job_dirs(sweep_dir)
    assert [p.name for p in dirs] == ["0", "1", "2", "3"]
    summaries = {(d / "dry_run.txt").read_text().strip() for d in dirs}
    assert len(summaries) == 4
    for lang, factor in CELLS:
        assert any(f"lang={lang} factor={factor}" in s for s in summaries), summaries
    assert any((sweep_dir / ".submitit").iterdir())  # ran through submitit, not the basic launcher
