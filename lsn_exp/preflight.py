"""Before anything loads: are the places a job writes to writable? One line if not, never a traceback.

Hydra creates the run (or sweep) dir before our code runs, so its check is a Hydra callback
(``hydra.callbacks.preflight`` in conf/config.yaml) that runs first; the cache dir is checked by the
job before the model loads. A probe file is created, written, fsynced and removed: a read-only mount,
a full disk or a path through a file all fail here, for root too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lsn_exp.errors import UserError, exit_with

PROBE = ".lsn_write_probe"


def unwritable(path: Path) -> str | None:
    """Why ``path`` (created when missing) cannot take a file, or None when it can."""
    probe = Path(path) / f"{PROBE}{os.getpid()}"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def require_writable(path: Path, what: str, fix: str) -> None:
    reason = unwritable(path)
    if reason is not None:
        raise UserError(f"{what} {path} is not writable ({reason}): {fix}")


class Preflight(Callback):
    """Stops a run or sweep whose output dir is not writable, in one line, before Hydra writes there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_unwritable(Path(str(config.hydra.run.dir)), "run dir", "set hydra.run.dir=<a writable dir>")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_unwritable(Path(str(config.hydra.sweep.dir)), "sweep dir", "set hydra.sweep.dir=<a writable dir>")


def _exit_if_unwritable(path: Path, what: str, fix: str) -> None:
    try:
        require_writable(path, what, fix)
    except UserError as err:
        exit_with(str(err))
