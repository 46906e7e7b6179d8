"""What the fault suite (tests/test_faults.py) shares: sweeps in real processes, kill points read from the
job's own log, integrity checks of a sweep and a cache, and the summary table `make test-faults` prints."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, REPO_ROOT, models
from lsn_exp.cache import LEDGER_FILE, META_FILE, CacheStore

# A 2 x 2 sweep that runs every stage a cell has (record, select, generate, score, write, W&B) in seconds.
TINY = ["model=tiny", "identify.languages=[en,fr,ja]", "identify.max_tokens=1500", "lss.n_facts=4",
        "lss.sources=[en,fr,ja]", "lss.bootstrap=50", "generate.n_prompts=1", "generate.max_new_tokens=4",
        "generate.sources=[en]"]
SWEEP = ["-m", "lang=fr,ja", "factor=2,pmax", "stage=run", "logger=wandb", *TINY]
N_CELLS = 4
PHASES = ("loading", "recording", "selection", "scoring", "writing", "wandb")

# The figures of every fault test, printed by conftest's pytest_terminal_summary.
FIGURES: list[dict] = []


def fresh_cache(root: Path) -> Path:
    """An empty cache dir of its own that shares only the converted Gemma-3 tokenizer (tiny models read it)."""
    cache = root / "cache"
    (cache / "models").mkdir(parents=True, exist_ok=True)
    real = models.converted_dir(OmegaConf.load(CONF_DIR / "model" / "gemma3_270m.yaml"))
    (cache / "models" / real.name).symlink_to(real)
    return cache


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "HYDRA_FULL_ERROR": "1"}


def start(args: list[str], log_path: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """``python -m lsn_exp ARGS`` in its own process group, stdout and stderr into ``log_path``."""
    out = open(log_path, "ab")
    try:
        # each cache entry's line is at DEBUG: the phase a kill landed in is read from them (phase_of)
        return subprocess.Popen([sys.executable, "-m", "lsn_exp", *args, "hydra.verbose=lsn_exp.cache"],
                                cwd=REPO_ROOT,
                                env={**env(), **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        out.close()


def run(args: list[str], log_path: Path, timeout: float = 900) -> int:
    proc = start(args, log_path)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"lsn_exp {' '.join(args)} did not finish in {timeout}s; log {log_path}")


def phase_of(log_text: str, n_languages: int = 3) -> str:
    """The phase a job was in when its log ended: read from its 'step ...' lines, the cache lines and W&B's."""
    phase, recordings = "loading", 0
    for line in log_text.splitlines():
        if "step load_model" in line:
            phase, recordings = "loading", 0
        elif "step identify_neurons" in line:
            phase = "recording"
        elif " recording " in line and ("saved" in line or "loaded cached" in line):
            recordings += 1
            phase = "selection" if recordings >= n_languages else "recording"
        elif "step generate_demo" in line or "step lss_scores" in line:
            phase = "scoring"
        elif "step write_results" in line:
            phase = "writing"
        elif "wandb:" in line:
            phase = "wandb"
    return phase


def kill_in_phase(proc: subprocess.Popen, log_path: Path, target: str, occurrence: int, delay_s: float,
                  timeout: float = 600) -> str | None:
    """SIGKILL the process group ``delay_s`` after the log first shows ``target`` for the ``occurrence``-th time;
    the phase the log shows at the kill, or None when the sweep ended first."""
    seen, previous, deadline = 0, None, time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        phase = phase_of(log_path.read_text(errors="replace"))
        if phase == target and previous != target:
            seen += 1
            if seen >= occurrence:
                time.sleep(delay_s)
                at_kill = phase_of(log_path.read_text(errors="replace"))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return at_kill
        previous = phase
        time.sleep(0.02)
    proc.wait(timeout=max(1.0, deadline - time.time()))
    return None


def cell_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def attempts(cell: Path) -> list[str]:
    path = cell / "attempts.log"
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines()] if path.exists() else []


def sweep_figures(sweep_dir: Path, cache: Path) -> dict:
    """What a finished sweep left: cells complete / lost / completed twice, W&B runs, temp files, damaged
    cache entries and work done twice (the cache ledger)."""
    cells = cell_dirs(sweep_dir) if sweep_dir.exists() else []
    complete = [c for c in cells if _valid_results(c / "results.json")]
    completions = [attempts(c).count("completed") for c in cells]
    return {"cells_complete": len(complete), "cells_lost": N_CELLS - len(complete),
            "duplicates": sum(max(0, n - 1) for n in completions),
            "wandb_logged": sum((c / "wandb_logged").exists() for c in cells),
            "temp_files": [str(p) for p in temp_files(sweep_dir) + temp_files(cache)],
            "damaged_entries": damaged_entries(cache), "computed_twice": computed_twice(cache)}


def _valid_results(path: Path) -> bool:
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(results.get("config_hash")) and results.get("stages_done", [])[-1:] == ["lss_scores"]


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if ".tmp" in p.name and "wandb" not in p.parts)


def stores(cache: Path) -> list[CacheStore]:
    return [CacheStore(p) for p in sorted((cache / "artifacts").glob("*")) if p.is_dir()]


def damaged_entries(cache: Path) -> list[str]:
    """Every cache entry that fails its checksum or does not load."""
    bad = []
    for store in stores(cache):
        for entry in sorted(store.root.glob(f"*/*/{META_FILE}")):
            try:
                CacheStore.read_entry(entry.parent, json.loads(entry.read_text())["key"])
            except Exception as err:  # noqa: BLE001
                bad.append(f"{entry.parent}: {err}")
    return bad


def ledger(cache: Path) -> list[dict]:
    return [row for store in stores(cache) for row in store.ledger()]


def computed_twice(cache: Path) -> list[tuple[str, str]]:
    """Entries computed more than once (the compare winner is rewritten on purpose: left out)."""
    counts = collections.Counter((row["kind"], row["key"]) for row in ledger(cache))
    return sorted(k for k, n in counts.items() if n > 1 and k[0] != "compare_best_method")


def computed_by_kind(cache: Path) -> dict[str, int]:
    return dict(collections.Counter(row["kind"] for row in ledger(cache)))


def has_ledger(cache: Path) -> bool:
    return any((s.root / LEDGER_FILE).exists() for s in stores(cache))


def summary_table(rows: list[dict]) -> str:
    """The figures as a fixed-width table: one row per fault kind."""
    header = ("fault", "trials", "injected", "survived", "data lost", "duplicates", "detail")
    lines = [header] + [tuple(str(r.get(k, "")) for k in ("fault", "trials", "injected", "survived", "lost",
                                                          "duplicates", "detail")) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


try:
    import submitit
except ImportError:  # submitit comes with hydra-submitit-launcher, a dependency
    submitit = None


class CliCell(submitit.helpers.Checkpointable if submitit else object):
    """One cell as a submitit job: ``python -m lsn_exp ARGS`` inside the worker process. On SIGUSR2 (preemption
    or timeout) submitit checkpoints it (the same arguments) and requeues it."""

    def __call__(self, args: list[str]) -> str:
        from lsn_exp.__main__ import main

        sys.argv = ["lsn_exp", "--config-path", str(CONF_DIR), *args]  # imported, not run: name the config dir
        main()
        return "done"


def wait_for_ledger(cache: Path, kind: str, running, timeout: float = 600) -> None:
    """Until the cache ledger shows a ``kind`` entry computed; fails as soon as ``running()`` is False."""
    deadline = time.time() + timeout
    while time.time() < deadline and running():
        if kind in computed_by_kind(cache):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {kind} was computed (job {'ended' if not running() else 'timed out'})")
