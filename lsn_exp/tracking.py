"""Run records: resolved config, results.json (atomic) and provenance first; W&B second.

A W&B failure is a warning, never a failed job: the local files are already on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lsn_exp import REPO_ROOT
from lsn_exp.files import sha256_file, write_json_atomic, write_text_atomic
from lsn_exp.results import RESULTS_FILE, SCHEMA_VERSION, to_json

log = logging.getLogger(__name__)

TRACKED_PACKAGES = ("lsn_exp", "torch", "transformers", "lm_eval", "hydra-core", "omegaconf",
                    "wandb", "safetensors", "sacrebleu", "py3langid",
                    "lingua-language-detector", "numpy")


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(model_identity: dict | None, data_files: list[Path]) -> dict:
    return {
        "git": git_state(),
        "packages": package_versions(),
        "host": platform.node(),
        "argv": sys.argv,
        "model": model_identity,
        "data_files": {str(p): sha256_file(p) for p in sorted(set(data_files))},
    }


def flatten(node: Any, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, so the W&B UI can group by model.name, lang.code, factor."""
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): node}


@dataclass
class RunRecord:
    """Everything a job leaves in its run dir; ``report`` reads only these files."""

    run_dir: Path
    config: dict
    results: dict = field(default_factory=dict)  # stage -> typed result (lsn_exp.results) or plain data
    provenance: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)  # W&B key -> PNG path
    tables: dict = field(default_factory=dict)  # W&B key -> CSV path
    artifacts: dict = field(default_factory=dict)  # W&B artifact type -> folder (the neuron set used)

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path) -> "RunRecord":
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return cls(run_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True))

    def json_results(self) -> dict:
        return to_json(self.results)

    def save(self) -> Path:
        path = self.run_dir / RESULTS_FILE
        write_json_atomic(path, {"schema_version": SCHEMA_VERSION, "config": self.config,
                                 "results": self.json_results(),
                                 "provenance": self.provenance, "images": self.images,
                                 "tables": self.tables, "artifacts": {k: str(v) for k, v in self.artifacts.items()}})
        return path

    @classmethod
    def load(cls, run_dir: Path) -> "RunRecord":
        """A saved record, its results typed again (to log a finished cell to W&B later)."""
        from lsn_exp.results import from_json

        payload = json.loads((run_dir / RESULTS_FILE).read_text())
        return cls(run_dir=run_dir, config=payload["config"], results=from_json(payload["results"]),
                   provenance=payload.get("provenance", {}), images=payload.get("images", {}),
                   tables=payload.get("tables", {}), artifacts=payload.get("artifacts", {}))


def summary_metrics(results: dict) -> dict:
    """The W&B summary: the same keys in every run of a stage, so a dashboard can chart any sweep."""
    from lsn_exp.results import DownstreamResult, LssMatrix, LssResult

    out: dict[str, Any] = {}
    for stage, result in results.items():
        if isinstance(result, LssResult):
            out.update({"lss/mean": result.mean, "lss/mean_paper": result.mean_paper,
                        **{f"lss/{cell.source}": cell.lss for cell in result.cells}})
        elif isinstance(result, LssMatrix):
            out.update({"lss_matrix/mean_offdiag": result.mean_offdiag,
                        "lss_matrix/mean_offdiag_paper": result.mean_offdiag_paper})
        elif isinstance(result, DownstreamResult):
            out.update({f"downstream/{name}/{metric}/delta": cell.delta for name, task in result.tasks.items()
                        for metric, cell in task.metrics.items()})
            out.update({f"downstream/{family}/{metric}/{side}": entry[side]
                        for family, metrics in result.summary().items() for metric, entry in metrics.items()
                        for side in ("self", "cross")})
        elif stage == "generate":
            out.update({f"generate/{k}": result[k] for k in ("steering_success", "target_share_unpatched",
                                                             "target_share_patched")})
        elif stage == "compare":
            out.update({f"compare/{row['method']}/{row['target']}/{row.get('domain', 'news')}/{k}": row[k]
                        for row in result["rows"] for k in ("steering_success", "n", "lss", "ppl", "final_score")})
            out.update({f"compare/{row['method']}/{row['target']}/{row.get('domain', 'news')}/steering_success_{end}":
                        row["steering_success_ci"][i] for row in result["rows"] if row.get("steering_success_ci")
                        for i, end in enumerate(("low", "high"))})
        elif stage == "identify":
            out.update({"identify/lape_union": result["lape_union"],
                        **{f"identify/lape/{c}": n for c, n in result["lape_neurons"].items()}})
    return {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool))}


WANDB_LOGGED = "wandb_logged"  # written in the run dir once a run has been logged completely: its id


def log_to_wandb(record: RunRecord, logger_cfg: DictConfig, group: str, name: str, job_type: str,
                 run_id: str | None = None, keys: dict | None = None) -> None:
    """Mirror a saved record to W&B; any failure becomes one warning.

    ``run_id`` (a job's config hash) makes a re-run, a requeued SLURM job or a resumed sweep update the same run;
    ``keys`` (model, lang, factor, method, stage) are top-level config entries to group by. In online mode an
    unreachable server (``logger.init_timeout`` seconds) sends the run to an offline one in the run dir instead,
    for ``wandb sync`` later."""
    if logger_cfg.name != "wandb":
        return
    attempt = dict(record=record, logger_cfg=logger_cfg, group=group, name=name, job_type=job_type, run_id=run_id,
                   keys=keys)
    try:
        _log_run(mode=logger_cfg.mode, **attempt)
        return
    except Exception as err:  # noqa: BLE001 - W&B must never fail a job
        failure = _one_line(err)
    if logger_cfg.mode == "online":
        try:
            offline_dir = _log_run(mode="offline", **attempt)
            warnings.warn(f"W&B online logging failed ({failure}); logged offline instead: "
                          f"`wandb sync {offline_dir}` uploads it later", stacklevel=2)
            return
        except Exception as err:  # noqa: BLE001
            failure += f"; offline too: {_one_line(err)}"
    warnings.warn(f"W&B logging failed ({failure}); results are in {record.run_dir}", stacklevel=2)


def _log_run(record: RunRecord, logger_cfg: DictConfig, mode: str, group: str, name: str, job_type: str,
             run_id: str | None, keys: dict | None) -> str:
    """One W&B run of the record; its local folder."""
    import wandb

    try:
        run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=mode,
                         group=group, name=name, job_type=job_type, dir=str(record.run_dir), id=run_id,
                         resume="allow" if run_id else None, config={**(keys or {}), **flatten(record.config)},
                         tags=list(logger_cfg.tags), reinit="finish_previous",
                         settings=wandb.Settings(init_timeout=float(logger_cfg.get("init_timeout", 30))))
        run.summary.update(summary_metrics(record.results))
        for key, png in record.images.items():
            run.log({key: wandb.Image(str(png))})
        for key, csv_path in record.tables.items():
            run.log({key: _csv_table(wandb, Path(csv_path))})
        for kind, folder in record.artifacts.items():
            run.log_artifact(_folder_artifact(wandb, kind, Path(folder), record.config))
        run.finish()
    finally:
        wandb.teardown()  # finish() returns before wandb-core has closed the run file; teardown waits for it
    (record.run_dir / WANDB_LOGGED).write_text(f"{run.id}\n")
    return run.settings.sync_dir


def _one_line(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:500]


def _folder_artifact(wandb, kind: str, folder: Path, config: dict):
    """A W&B Artifact of a folder (the neuron set: card + tensors), named after the model and its content."""
    card_path = folder / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())).hexdigest()
    name = f"{kind}-{config.get('model', {}).get('name', 'model')}-{digest[:12]}"
    artifact = wandb.Artifact(name, type=kind, metadata={k: card[k] for k in ("format", "model", "languages",
                                                                             "selection", "tokens") if k in card})
    artifact.add_dir(str(folder))
    return artifact


def _csv_table(wandb, path: Path):
    import csv

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return wandb.Table(columns=rows[0], data=rows[1:])
