"""Scoring split over forked workers: the same answers as one process, under a patch too; a worker that fails
or dies fails the call and leaves no process behind (tiny models, CPU, Linux)."""

from __future__ import annotations

import os
import signal
import sys

import psutil
import pytest
import torch
from conftest import synthetic_neurons
from test_lss import _lss_instances

from lsn_exp import data, forkmap, lmeval, preflight, sharedprompts
from lsn_exp.patch import Patch
from lsn_exp.specs import PatchSpec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked scoring runs on Linux only")


def test_forked_map_keeps_item_order_and_reports_every_result_in_the_parent():
    seen = []
    out = forkmap.forked_map(lambda x: (x * x, os.getpid()), list(range(13)), 3, lambda item, r: seen.append(item))
    assert [square for square, _ in out] == [x * x for x in range(13)]
    assert len({pid for _, pid in out}) == 3 and {pid for _, pid in out[::3]} == {os.getpid()}  # 0, 3, 6 ...
    assert sorted(seen) == list(range(13))
    few = forkmap.forked_map(lambda x: os.getpid(), list(range(7)), 3)  # under 4 items each: 7 // 4 = 1 process
    assert set(few) == {os.getpid()}
    assert torch.get_num_threads() >= 1 and not psutil.Process().children()


def test_scores_with_two_processes_equal_one_process_bit_for_bit(tiny, data_root, monkeypatch):
    neurons = synthetic_neurons(tiny, list(data.LSS_LANGS))
    instances = _lss_instances(data_root, n_facts=5)  # 10 prompts: batches of 1 give each process 5
    forks = []
    fork = forkmap._fork
    monkeypatch.setattr(forkmap, "_fork", lambda *a: forks.append(1) or fork(*a))
    monkeypatch.setattr(sharedprompts, "FORK_MIN_REQUESTS", 1)  # 20 requests: fork anyway
    threads = torch.get_num_threads()
    for patch in (None, Patch(tiny, neurons, PatchSpec(target="fr", op="set", source="pmax"))):
        scores = {}
        for processes in (1, 2):
            lm = lmeval.hflm(tiny, 1)
            lm.scoring_processes = processes
            with patch or _nothing():
                scores[processes] = lm.loglikelihood(_requests(instances), disable_tqdm=True)
        assert scores[1] == scores[2]
    assert len(forks) == 2 and torch.get_num_threads() == threads  # one worker per 2-process call; restored


def test_a_failing_or_dying_worker_fails_the_call_and_no_child_is_left():
    parent = os.getpid()

    def fails(x):
        if os.getpid() != parent:
            raise ValueError(f"boom {x}")
        return x

    with pytest.raises(RuntimeError, match="(?s)failed:.*ValueError: boom 1"):
        forkmap.forked_map(fails, list(range(8)), 2)

    def dies(x):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return x

    with pytest.raises(RuntimeError, match="died \\(signal SIGKILL\\)"):
        forkmap.forked_map(dies, list(range(8)), 2)
    assert not psutil.Process().children()


def test_a_worker_leaves_slurms_signals_to_its_parent():
    """SLURM sends SIGTERM (requeue, scancel) and SIGUSR2 (timeout) to every process of a job: a worker keeps
    scoring, so the parent's handler alone decides (submitit bypasses SIGTERM and requeues on SIGUSR2)."""
    parent = os.getpid()

    def signalled(x):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR2)
        return x * 2

    assert forkmap.forked_map(signalled, list(range(8)), 2) == [x * 2 for x in range(8)]


def test_auto_uses_two_processes_on_a_multi_threaded_cpu_only():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert forkmap.processes_for("auto", torch.device("cpu")) == 2
        assert forkmap.processes_for("auto", torch.device("cuda")) == 1
        assert forkmap.processes_for(1, torch.device("cpu")) == 1
        torch.set_num_threads(1)
        assert forkmap.processes_for(None, torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_scoring_processes_above_one_on_an_accelerator_is_a_one_line_error_before_the_model_loads(device):
    """Forked workers cannot use a model once CUDA has started: model.device=cuda with scoring_processes=2 fails in
    settings validation (no torch there); with device=auto the job checks the resolved device before it loads."""
    from hydra import compose, initialize_config_dir

    from lsn_exp import CONF_DIR
    from lsn_exp.errors import UserError
    from lsn_exp.job import STAGES

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def composed(where: str, processes: str):
            return compose(config_name="config",
                           overrides=["model=tiny", f"model.device={where}", f"scoring_processes={processes}"])

        bad, fine, auto = composed(device, "2"), [composed(device, n) for n in ("1", "auto")], composed("auto", "2")
    with pytest.raises(UserError, match=f"scoring_processes=2 .*model.device={device}.*scoring_processes=1") as err:
        preflight.validate(bad, STAGES)
    assert "\n" not in str(err.value)
    for cfg in (*fine, auto):  # auto: decided once torch has resolved the device
        preflight.validate(cfg, STAGES)
    with pytest.raises(UserError, match=f"scoring_processes=2 .*model.device={device.split(':')[0]}"):
        forkmap.processes_for(2, torch.device(device.split(":")[0]))
    assert forkmap.processes_for("auto", torch.device("cuda")) == forkmap.processes_for(1, torch.device("cuda")) == 1


def _requests(instances):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, inst.args, 0) for inst in instances]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_killed_parent_takes_its_workers_with_it(tmp_path):
    """SIGKILL on a job while its workers score: no worker outlives it (PR_SET_PDEATHSIG)."""
    import subprocess
    import time

    pids = tmp_path / "pids"
    script = (f"import os, time\nfrom lsn_exp import forkmap\n"
              f"def slow(x):\n    open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(60)\n"
              "forkmap.forked_map(slow, list(range(8)), 2)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.2)
    workers = {int(p) for p in pids.read_text().split()} - {parent.pid}
    assert len(workers) == 1, pids.read_text()
    parent.kill()
    parent.wait(timeout=30)
    time.sleep(1)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers)
