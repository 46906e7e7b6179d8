"""The fault suite (`make test-faults`): kills at random moments, races, damaged caches, unwritable places and
full disks, W&B unreachable, preemption. Every test runs real processes on the tiny model and counts what
it cares about: cells lost, cells completed twice, cache entries computed twice or left damaged.
Its figures are printed as one table at the end of the session (conftest.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

import faultlib as fl
from conftest import run_cli
from test_slurm import slurm_cluster  # noqa: F401 - the fixture
from lsn_exp import CONF_DIR, models
from lsn_exp.cache import META_FILE, TENSORS_FILE
from lsn_exp.report import build_report

pytestmark = [pytest.mark.slow, pytest.mark.faults]

KILL_TRIALS = int(os.environ.get("LSN_FAULT_TRIALS", "10"))
KILL_SEED = int(os.environ.get("LSN_FAULT_SEED", "20261201"))
# Where each trial aims (the phase seen at the kill is what counts), cycled over the trials.
AIMS = ("recording", "selection", "scoring", "writing", "wandb")


def test_a_sweep_killed_at_random_moments_resumes_with_nothing_lost_or_done_twice(tmp_path):
    """KILL_TRIALS sweeps, each SIGKILLed at a seeded random moment inside a phase, then run again: after each,
    every cell has valid results exactly once, nothing is left that blocks the re-run, every cache entry
    passes its checksum, nothing in the cache was computed twice, and the report builds."""
    rng = random.Random(KILL_SEED)
    trials, killed_in = [], []
    for trial in range(KILL_TRIALS):
        aim, occurrence = AIMS[trial % len(AIMS)], rng.randint(1, fl.N_CELLS)
        if aim in ("recording", "selection"):
            occurrence = 1  # recordings are made by the first cell only; the others load them
        delay = rng.uniform(0, {"recording": 0.3, "selection": 0.05, "scoring": 0.15, "writing": 0.05,
                                "wandb": 1.0}[aim])
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        cache, sweep = fl.fresh_cache(root), root / "sweep"
        args = [*fl.SWEEP, f"hydra.sweep.dir={sweep}", f"cache_dir={cache}"]
        phase = fl.kill_in_phase(fl.start(args, root / "killed.log"), root / "killed.log", aim, occurrence, delay)
        killed_in.append(phase or "none (finished first)")
        assert fl.run(args, root / "rerun.log") == 0, (root / "rerun.log").read_text()[-3000:]
        figures = fl.sweep_figures(sweep, cache)
        report = build_report(sweep).read_text()
        trials.append({"trial": trial, "seed": KILL_SEED, "aim": aim, "occurrence": occurrence,
                       "delay_s": round(delay, 3), "killed_in": killed_in[-1], **figures})
        assert figures["cells_complete"] == fl.N_CELLS and figures["duplicates"] == 0, trials[-1]
        assert not figures["temp_files"] and not figures["damaged_entries"], trials[-1]
        assert not figures["computed_twice"] and figures["wandb_logged"] == fl.N_CELLS, trials[-1]
        assert f"{fl.N_CELLS} complete cell(s); 0 missing." in report
    (tmp_path / "trials.json").write_text(json.dumps(trials, indent=2))
    covered = sorted({t["killed_in"] for t in trials})
    fl.FIGURES.append({"fault": "SIGKILL at a random moment", "trials": KILL_TRIALS,
                       "injected": sum(t["killed_in"] != "none (finished first)" for t in trials),
                       "survived": KILL_TRIALS, "lost": 0, "duplicates": 0,
                       "detail": f"seed {KILL_SEED}; killed in: " + ", ".join(
                           f"{p} {killed_in.count(p)}" for p in covered)})
    # which phase a seeded kill lands in depends on the machine's speed (a run here after issue 23's changes hit
    # loading, selection, scoring, writing and wandb, but not recording): ask for breadth, not for one phase each
    assert {"scoring", "writing"} <= set(covered) and len(set(covered) - {"none (finished first)"}) >= 4, covered


def test_three_processes_on_one_cell_compute_it_and_its_artifacts_once(tmp_path):
    """Three processes start the same cell at once: one computes, the others wait on its lock and skip."""
    cache, run_dir = fl.fresh_cache(tmp_path), tmp_path / "cell"
    args = ["lang=fr", "factor=2", "stage=lss", "logger=none", *fl.TINY, f"hydra.run.dir={run_dir}",
            f"cache_dir={cache}"]
    procs = [fl.start(args, tmp_path / f"p{i}.log") for i in range(3)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0, 0]
    outcomes = fl.attempts(run_dir)
    assert outcomes.count("completed") == 1 and outcomes.count("skipped: complete results exist for this config") == 2
    assert not fl.computed_twice(cache) and not fl.damaged_entries(cache)
    assert not any("is damaged" in (tmp_path / f"p{i}.log").read_text() for i in range(3))
    fl.FIGURES.append({"fault": "3 processes, same cell", "trials": 1, "injected": 3, "survived": 3, "lost": 0,
                       "duplicates": 0, "detail": f"computed: {fl.computed_by_kind(cache)}"})


def test_three_cells_that_need_the_same_artifacts_compute_each_once(tmp_path):
    """Three cells (three factors) start at once and need the same recordings, neuron set and unpatched LSS
    run toward fr: each entry is computed by one of them; the others wait and load it."""
    cache = fl.fresh_cache(tmp_path)
    procs = [fl.start([f"lang=fr", f"factor={factor}", "stage=lss", "logger=none", *fl.TINY,
                       f"hydra.run.dir={tmp_path / factor}", f"cache_dir={cache}"], tmp_path / f"{factor}.log")
             for factor in ("2", "3", "pmax")]
    assert [p.wait(timeout=900) for p in procs] == [0, 0, 0]
    by_kind = fl.computed_by_kind(cache)
    assert by_kind["recording"] == 3 and by_kind["neurons"] == 1 and by_kind["lss_unpatched"] == 1, by_kind
    assert not fl.computed_twice(cache) and not fl.damaged_entries(cache)
    loads = sum((tmp_path / f"{f}.log").read_text().count("loaded cached") for f in ("2", "3", "pmax"))
    assert loads >= 2 * (3 + 1), loads  # two of the three loaded the 3 recordings and the neuron set
    fl.FIGURES.append({"fault": "3 processes, shared artifacts", "trials": 1, "injected": 3, "survived": 3,
                       "lost": 0, "duplicates": 0, "detail": f"computed: {by_kind}; loads {loads}"})


# --- damaged caches ---------------------------------------------------------------------------------------------

DAMAGE_JOBS = {  # kind -> the job that makes (and later reads) it
    "recording": ["stage=identify"],
    "neurons": ["stage=identify"],
    "lss_unpatched": ["stage=lss"],
    "downstream_unpatched": ["stage=downstream", "eval.tasks=[xcopa]", "eval.limit=4", "eval.langs=[id]"],
}


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one bit in the middle of the tensor bytes
        data[len(data) * 3 // 4] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("kind", sorted(DAMAGE_JOBS))
def test_a_damaged_cache_entry_is_detected_in_one_line_and_recomputed(tmp_path, kind, how):
    cache = fl.fresh_cache(tmp_path)
    args = ["lang=fr", "factor=2", "logger=none", *fl.TINY, *DAMAGE_JOBS[kind], f"cache_dir={cache}"]
    assert fl.run([*args, f"hydra.run.dir={tmp_path / 'first'}"], tmp_path / "first.log") == 0, \
        (tmp_path / "first.log").read_text()[-3000:]
    entries = sorted((fl.stores(cache)[0].root / kind).glob(f"*/{TENSORS_FILE}"))
    assert entries, f"the job made no {kind} entry"
    victim = entries[0].parent
    _damage(victim / TENSORS_FILE, how)
    log = tmp_path / "second.log"
    assert fl.run([*args, f"hydra.run.dir={tmp_path / 'second'}"], log) == 0, log.read_text()[-3000:]
    warnings = [line for line in log.read_text().splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and victim.name in warnings[0] and kind in warnings[0], warnings
    recomputed = [row for row in fl.ledger(cache) if row["key"] == victim.name]
    assert len(recomputed) == 2 and not fl.damaged_entries(cache)
    first, second = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("first", "second"))
    stage = DAMAGE_JOBS[kind][0].split("=")[1]
    key = {"identify": "identify", "lss": "lss", "downstream": "downstream"}[stage]
    assert _numbers(first[key]) == _numbers(second[key])  # the same numbers again
    fl.FIGURES.append({"fault": f"damaged {kind} ({how})", "trials": 1, "injected": 1, "survived": 1, "lost": 0,
                       "duplicates": 0, "detail": "detected in one line, recomputed, same results"})


def _numbers(results):
    """A stage's results without what says where they came from (cache flags, timings)."""
    if isinstance(results, dict):
        return {k: _numbers(v) for k, v in results.items()
                if not any(word in k for word in ("cached", "recorded", "wall_time", "seconds"))}
    if isinstance(results, list):
        return [_numbers(v) for v in results]
    return results


def test_a_damaged_converted_model_is_a_one_line_error_naming_make_install(tmp_path):
    cache = tmp_path / "cache"
    real = models.converted_dir(models_cfg("gemma3_270m"))
    copy = cache / "models" / real.name
    copy.mkdir(parents=True)
    for name in (*models.TOKENIZER_FILES, "lsn_source.json", "lsn_manifest.json"):
        shutil.copyfile(real / name, copy / name)
    args = ["lang=fr", "stage=identify", "logger=none", *fl.TINY, f"cache_dir={cache}"]
    ok = run_cli(*args, f"hydra.run.dir={tmp_path / 'ok'}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    _damage(copy / "tokenizer.json", "bitflip")
    bad = run_cli(*args, f"hydra.run.dir={tmp_path / 'bad'}")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("lsn_exp: error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "tokenizer.json" in errors[0] and "make install" in errors[0] and str(copy) in errors[0]
    fl.FIGURES.append({"fault": "damaged converted model", "trials": 1, "injected": 1, "survived": 1, "lost": 0,
                       "duplicates": 0, "detail": "one-line error naming make install"})


def models_cfg(name: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")


# --- unwritable places, full disks ------------------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """A dir nobody can write to: a read-only tmpfs for root (root ignores modes), mode 0555 otherwise."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here (root without CAP_SYS_ADMIN)")
        yield path
        subprocess.run(["umount", str(path)])
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that fills up."""
    path = tmp_path / "small"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)]).returncode:
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
    yield path
    subprocess.run(["umount", str(path)])


@pytest.mark.parametrize("place", ["run_dir", "sweep_dir", "cache_dir"])
def test_an_unwritable_place_is_a_one_line_error_before_the_model_loads(tmp_path, read_only_dir, place):
    cache = fl.fresh_cache(tmp_path)
    target = read_only_dir / "x"
    args = {"run_dir": ["stage=identify", f"hydra.run.dir={target}", f"cache_dir={cache}"],
            "sweep_dir": ["-m", "stage=identify", "factor=2,3", f"hydra.sweep.dir={target}", f"cache_dir={cache}"],
            "cache_dir": ["stage=identify", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={target}"]}[place]
    started = time.time()
    result = run_cli(*args, "lang=fr", "logger=none", *fl.TINY, timeout=120)  # -m first
    errors = [line for line in result.stderr.splitlines() if line.startswith("lsn_exp: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert str(target) in errors[0] and "not writable" in errors[0] and "Traceback" not in result.stderr
    assert "step load_model" not in result.stdout + result.stderr  # nothing loaded
    fl.FIGURES.append({"fault": f"unwritable {place}", "trials": 1, "injected": 1, "survived": 1, "lost": 0,
                       "duplicates": 0, "detail": f"one-line error in {time.time() - started:.1f} s"})


def test_an_unwritable_wandb_dir_is_a_warning_and_the_results_are_kept(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("a file where W&B wants its dir\n")
    result = run_cli("lang=fr", "factor=2", "stage=lss", "logger=wandb", *fl.TINY, f"hydra.run.dir={run_dir}",
                     f"cache_dir={fl.fresh_cache(tmp_path)}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if "W&B logging failed" in line]
    assert len(warned) == 1 and fl._valid_results(run_dir / "results.json")
    assert not (run_dir / "wandb_logged").exists()
    fl.FIGURES.append({"fault": "unwritable W&B dir", "trials": 1, "injected": 1, "survived": 1, "lost": 0,
                       "duplicates": 0, "detail": "one warning, results.json complete"})


def test_a_disk_that_fills_up_leaves_no_partial_results_and_no_corrupt_cache_entry(tmp_path, small_disk):
    """The run dir on a 4 MiB disk filled to just below what results.json needs, then the cache on a disk too
    small for its entries: each job fails in one line; no results.json, no temp file and no damaged entry is
    left; with space again, the same commands finish."""
    cache = fl.fresh_cache(tmp_path)
    args = ["lang=fr", "factor=2", "stage=lss", "logger=none", *fl.TINY]
    reference = tmp_path / "reference"
    assert fl.run([*args, f"hydra.run.dir={reference}", f"cache_dir={cache}"], tmp_path / "ref.log") == 0
    others = sum(_pages(p.stat().st_size) for p in reference.rglob("*") if p.is_file() and p.name != "results.json")
    assert _pages((reference / "results.json").stat().st_size) >= 3 * PAGE  # room to fail midway
    _fill(small_disk, leave=others + 2 * PAGE)  # the other files fit (give or take a page), results.json not
    run_dir = small_disk / "run"
    failed = run_cli(*args, f"hydra.run.dir={run_dir}", f"cache_dir={cache}", timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "No space left on device" in failed.stderr and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert not (run_dir / "results.json").exists() and not fl.temp_files(run_dir)
    (small_disk / "filler").unlink()
    again = run_cli(*args, f"hydra.run.dir={run_dir}", f"cache_dir={cache}", timeout=600)
    assert again.returncode == 0 and fl._valid_results(run_dir / "results.json"), again.stderr[-3000:]

    small_cache = small_disk / "cache"  # a fresh cache that cannot hold the recordings
    shutil.copytree(cache / "models", small_cache / "models", symlinks=True)
    _fill(small_disk, leave=6 * PAGE)  # one recording entry fits, the next fails midway
    full = run_cli(*args, f"hydra.run.dir={tmp_path / 'run2'}", f"cache_dir={small_cache}", timeout=600)
    assert full.returncode == 2 and "No space left on device" in full.stderr, full.stderr[-3000:]
    assert not fl.temp_files(small_cache) and not fl.damaged_entries(small_cache)
    (small_disk / "filler").unlink()
    fine = run_cli(*args, f"hydra.run.dir={tmp_path / 'run2'}", f"cache_dir={small_cache}", timeout=600)
    assert fine.returncode == 0 and not fl.damaged_entries(small_cache), fine.stderr[-3000:]
    fl.FIGURES.append({"fault": "disk full (run dir, cache)", "trials": 2, "injected": 2, "survived": 2, "lost": 0,
                       "duplicates": 0, "detail": "no partial results.json, no temp file, no damaged entry"})


PAGE = 4096  # tmpfs counts whole pages


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


def _fill(disk, leave: int) -> None:
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


# --- W&B unreachable --------------------------------------------------------------------------------------------

def test_wandb_unreachable_online_logs_offline_with_one_warning_and_keeps_the_results(tmp_path):
    from test_tracking import read_offline_run

    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": None, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40}
    started = time.time()
    result = run_cli("lang=fr", "factor=2", "stage=lss", "logger=wandb", "logger.mode=online",
                     "logger.init_timeout=10", *fl.TINY, f"hydra.run.dir={run_dir}",
                     f"cache_dir={fl.fresh_cache(tmp_path)}", timeout=600, env=env)
    seconds = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if "W&B online logging failed" in line]
    assert len(warned) == 1 and "wandb sync" in warned[0], result.stderr[-3000:]
    assert fl._valid_results(run_dir / "results.json") and (run_dir / "wandb_logged").exists()
    offline = read_offline_run(run_dir)  # complete, ready for `wandb sync`
    saved = json.loads((run_dir / "results.json").read_text())["results"]
    assert offline["summary"]["lss/mean"] == saved["lss"]["mean"]
    fl.FIGURES.append({"fault": "W&B unreachable (online)", "trials": 1, "injected": 1, "survived": 1, "lost": 0,
                       "duplicates": 0, "detail": f"one warning, offline run to sync; job {seconds:.0f} s"})


# --- preemption -------------------------------------------------------------------------------------------------

def test_a_cell_interrupted_by_submitit_resumes_from_its_cache_and_finishes_once(tmp_path):
    """A preemption signal (SIGUSR2, what submitit's local controller and SLURM send) hits a cell after its
    neuron set is saved; the cell is checkpointed, requeued, and finishes without recomputing anything."""
    import cloudpickle
    import psutil
    import submitit

    cloudpickle.register_pickle_by_value(fl)
    cache, run_dir = fl.fresh_cache(tmp_path), tmp_path / "cell"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=20)
    job = executor.submit(fl.CliCell(), ["lang=fr", "factor=2", "stage=lss", "logger=none", *fl.TINY,
                                         f"hydra.run.dir={run_dir}", f"cache_dir={cache}"])
    fl.wait_for_ledger(cache, "neurons", running=lambda: not job.done())
    # submitit 1.5's job._interrupt() signals the local controller, which forwards SIGTERM only (SIGUSR2 would
    # end the controller and orphan the task): send the task the signal the controller sends at a timeout.
    (task,) = psutil.Process(job._process.pid).children()
    task.send_signal(submitit.JobEnvironment._usr_sig())
    deadline = time.time() + 900
    while not job.done() and time.time() < deadline:
        time.sleep(0.5)
    assert job.result() == "done"
    outcomes = fl.attempts(run_dir)
    assert outcomes == ["started", "started", "completed"], outcomes
    assert not fl.computed_twice(cache) and fl._valid_results(run_dir / "results.json")
    assert "Requeued job" in "".join(p.read_text() for p in (tmp_path / "submitit").glob("*_log.*"))
    fl.FIGURES.append({"fault": "preemption (submitit local)", "trials": 1, "injected": 1, "survived": 1,
                       "lost": 0, "duplicates": 0, "detail": f"recomputed artifacts 0; computed "
                                                             f"{fl.computed_by_kind(cache)}"})


def test_a_cell_requeued_by_slurm_resumes_from_its_cache_and_finishes_once(slurm_cluster, tmp_path):
    """`scontrol requeue` on a running cell of a submitit_slurm sweep: SLURM kills and restarts it; the cell
    resumes from the cache and the sweep finishes with the cell complete once."""
    cache, sweep = fl.fresh_cache(tmp_path), tmp_path / "sweep"
    # Submitit bypasses the SIGTERM, SIGKILL follows after KillWait (10 s): what is left of the cell once the
    # first recording is cached (about 50 s of LSS at one thread on a 2-core box) must outlast it on a machine
    # 2x faster. At 150 facts it did not: the first attempt finished within KillWait and was never killed.
    longer = ["identify.max_tokens=20000", "lss.n_facts=1000"]
    args = ["-m", "lang=fr", "factor=2", "stage=lss", "logger=none", *fl.TINY, *longer, f"hydra.sweep.dir={sweep}",
            f"cache_dir={cache}", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
            "hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
    proc = fl.start(args, tmp_path / "sweep.log")
    fl.wait_for_ledger(cache, "recording", running=lambda: proc.poll() is None)
    (job_dir,) = [p for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit()]
    requeue = subprocess.run(["scontrol", "requeue", job_dir.name], capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    assert proc.wait(timeout=900) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    outcomes = fl.attempts(sweep / "0")
    assert outcomes.count("started") == 2 and outcomes.count("completed") == 1, outcomes
    assert not fl.computed_twice(cache) and fl._valid_results(sweep / "0" / "results.json")
    fl.FIGURES.append({"fault": "requeue (local SLURM)", "trials": 1, "injected": 1, "survived": 1, "lost": 0,
                       "duplicates": 0, "detail": f"recomputed artifacts 0; attempts {outcomes}"})
