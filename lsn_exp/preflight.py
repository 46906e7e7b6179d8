"""Before anything loads: is the config valid, and are the places a job writes to writable? One line if not,
never a traceback.

``validate(cfg, stages)`` runs every check a job's config can fail (a dry run included), so a sweep is checked
before it goes to SLURM: each stage's settings parser (lsn_exp.settings) and each stage's own checks (layer
ranges against the model's config, the factor search's grid, a neuron folder's card, lm-eval task names). Only
light imports here (no torch, no lm-eval at import): a bad override fails in well under a second.

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

from lsn_exp import checks
from lsn_exp.errors import UserError, exit_with
from lsn_exp.factorsearch import grid_specs
from lsn_exp.models import ARCHITECTURES, model_layers
from lsn_exp.neurons import read_card
from lsn_exp.prompts import check_blocks
from lsn_exp.settings import JobSettings, parse_job
from lsn_exp.specs import PatchSpec, SteerSpec, check_layers, parse_factor
from lsn_exp.taskindex import TASK_FAMILIES, check_lm_eval_tasks

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


# --- the whole job ---------------------------------------------------------------------------------------------

def validate(cfg, stages) -> JobSettings:
    """Every check a job's config can fail without loading a model (``dry_run=true`` runs it too): every key of
    every group, whatever the stage; the prompt blocks, lm-eval task names and layer ranges where the stage uses them.

    Returns the job's typed settings (parsed once). Raises UserError (one line). Layer ranges are checked against
    the model's config when it is on disk.
    """
    stage = cfg.get("stage")
    if not isinstance(stage, str) or stage not in stages:
        raise UserError(f"stage={stage} is not one of {', '.join(stages)}")
    job = parse_job(cfg)
    config = job.config
    checks.check_model(config["model"], ARCHITECTURES)
    if stage == "downstream" and config["prompt"].get("mode", "none") != "none":
        raise UserError("prompt baselines are scored on LSS and generation, not on downstream tasks: "
                        "use prompt.mode=none with stage=downstream")
    if job.neurons_from is not None:
        try:
            read_card(job.neurons_from)
        except UserError as err:
            raise UserError(f"identify.from={job.neurons_from}: {err}") from None
    if stage == "downstream":
        check_lm_eval_tasks([n for n in job.eval.families if n not in TASK_FAMILIES], job.eval.include_path,
                            list(TASK_FAMILIES))
    patch_cfg, steer_cfg, _ = job.intervention_config
    factor = job.factor
    if factor.kind == "best":  # the winner brings op/value/stat; the rest of the patch must still parse
        patch_cfg, factor = {**patch_cfg, "op": None, "value": None, "stat": None}, parse_factor(1)
    spec = PatchSpec.from_config(patch_cfg, factor, job.target)
    steer = SteerSpec.from_config(steer_cfg, job.target)
    n_layers = model_layers(job.model, job.cache_dir)
    for name, layers in (("patch.layers", spec.layers), ("steer.layers", steer.layers)):
        if layers is not None and n_layers is not None:
            check_layers(layers, n_layers, name)
    for method in job.compare.methods:
        _check_method(config, method, job.target)
    if stage == "compare" or job.method == "best":  # the prompt blocks a compare run (or method=best) reads
        check_blocks(job.generate, job.data_root, job.compare)
    grid_specs(job.factor_search, config["patch"], job.target)  # the factor search's grid (factor_search, best)
    return job


def _check_method(job: dict, method: dict, target: str) -> None:
    """A compare.methods entry parses as the job's own settings would: its factor and patch / steer / prompt."""
    try:
        merged = {}
        for group in ("patch", "steer", "prompt"):
            extra = method.get(group) or {}
            if not isinstance(extra, dict) or set(extra) - set(job[group]):
                raise UserError(f"{group}={extra!r} is not allowed: use keys of {group} ({', '.join(job[group])})")
            merged[group] = {**job[group], **extra}
        PatchSpec.from_config(merged["patch"], parse_factor(method.get("factor", 1)), target)
        SteerSpec.from_config(merged["steer"], target)
        checks.check_prompt(merged["prompt"])
    except UserError as err:
        raise UserError(f"compare.methods {method.get('name')!r}: {err}") from None
