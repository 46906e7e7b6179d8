"""A CPU scoring loop split over forked processes: worker k takes items k, k + n, ... at threads / n threads.

Why: on a 2-core CPU, two 1-thread processes scored LSS requests 1.25x faster than one 2-thread process
(benchmarks/bench_levers.py lss_layout): many of a short batch's ops are too small to keep two threads
busy. A forked worker shares the parent's model memory (copy on write) and any patch installed on it, so it
needs no setup. Only on Linux and a CPU model: fork is unsafe once CUDA is initialised, and on macOS.
Each item is computed exactly as in the serial loop (the same batches), at fewer threads.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import traceback
from typing import Callable, Sequence

import torch

from lsn_exp import checks

PR_SET_PDEATHSIG = 1
MIN_ITEMS_PER_PROCESS = 4  # below this a fork costs more than it saves (an 8-fact LSS run: 3 batches)


def processes_for(setting, device) -> int:
    """``scoring_processes``: auto (2 on a Linux CPU with at least 2 torch threads, else 1) or a number (1: off; above
    1 only on a CPU: a UserError elsewhere). The job asks before the model loads."""
    kind = getattr(device, "type", str(device))
    if setting in (None, "auto"):
        return 2 if kind == "cpu" and sys.platform.startswith("linux") and torch.get_num_threads() >= 2 else 1
    return checks.scoring_processes(setting, kind)


def forked_map(fn: Callable, items: Sequence, processes: int, on_result: Callable | None = None) -> list:
    """``[fn(item) for item in items]``, the items shared round robin by the parent and ``processes - 1``
    forked children (fewer when there are under MIN_ITEMS_PER_PROCESS items each). ``on_result(item, result)``
    runs in the parent, for every item, in item order per worker. A child that fails or dies fails the call."""
    processes = min(processes, len(items) // MIN_ITEMS_PER_PROCESS)
    if processes <= 1:
        return _serial(fn, items, on_result)
    threads = torch.get_num_threads()
    children = [_fork(fn, items, k, processes, max(1, threads // processes)) for k in range(1, processes)]
    results: list = [None] * len(items)
    try:
        torch.set_num_threads(max(1, threads // processes))
        for i in range(0, len(items), processes):
            results[i] = fn(items[i])
            if on_result:
                on_result(items[i], results[i])
        for k in range(1, processes):
            pid, fd = children.pop(0)
            for i, result in zip(range(k, len(items), processes), _collect(pid, fd)):
                results[i] = result
                if on_result:
                    on_result(items[i], result)
    finally:
        torch.set_num_threads(threads)
        for pid, fd in children:  # the parent failed or was interrupted: stop the workers
            _kill(pid, fd)
    return results


def _serial(fn, items, on_result) -> list:
    results = []
    for item in items:
        results.append(fn(item))
        if on_result:
            on_result(item, results[-1])
    return results


def _fork(fn, items, k: int, step: int, threads: int) -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return pid, read_fd
    os.close(read_fd)  # the child from here on: it never returns
    status = 1
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the parent
        # SLURM signals every process of a job: the parent alone decides (submitit's requeue, Ctrl-C), and its
        # exit ends the workers through PDEATHSIG.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        torch.set_num_threads(threads)
        payload = ("ok", [fn(items[i]) for i in range(k, len(items), step)])
        status = 0
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        payload = ("error", traceback.format_exc())
    with os.fdopen(write_fd, "wb") as out:
        pickle.dump(payload, out)
    os._exit(status)


def _collect(pid: int, fd: int) -> list:
    """A child's answers, once it has exited (it is killed if reading them is interrupted)."""
    try:
        with os.fdopen(fd, "rb") as pipe:
            data = pipe.read()
    except BaseException:
        _kill(pid)
        raise
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"a scoring worker (pid {pid}) died ({_describe(status)}) before it answered")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise RuntimeError(f"a scoring worker (pid {pid}) failed:\n{value}")
    return value


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _kill(pid: int, fd: int | None = None) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    if fd is not None:
        os.close(fd)
