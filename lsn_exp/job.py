"""One job: cfg -> ModelHandle -> NeuronArtifact -> Patch -> Evaluation -> RunRecord."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lsn_exp import data
from lsn_exp.patch import parse_factor
from lsn_exp.tracking import RunRecord, log_to_wandb, provenance

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> RunRecord | None:
    factor = parse_factor(cfg.factor)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = f"model={cfg.model.name} lang={cfg.lang.code} factor={factor} stage={cfg.stage}"
    record = RunRecord.start(cfg, run_dir)
    if cfg.dry_run:
        (run_dir / "dry_run.txt").write_text(summary + "\n")
        print(f"[dry run] {summary} -> {run_dir}")
        return None
    data_root = data.resolve_root(cfg.data.root)
    started = time.time()
    from lsn_exp import models

    handle = models.load(cfg.model, cfg.cache_dir)
    record.results["stages_done"] = ["load_model"]
    record.results["model"] = {"layers": handle.adapter.n_layers, "d_ff": handle.adapter.d_ff,
                               "activation": handle.adapter.activation}
    record.results["wall_time_s"] = round(time.time() - started, 2)
    record.provenance = provenance(handle.identity, [])
    record.provenance["data_root"] = str(data_root) if data_root else "hf-hub"
    path = record.save()
    log.info("%s | wrote %s", summary, path)
    log_to_wandb(record, cfg.logger, group=sweep_group(), name=f"{cfg.model.name}-{cfg.lang.code}-{factor}",
                 job_type=cfg.stage)
    return record


def sweep_group() -> str:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        return Path(hydra_cfg.sweep.dir).name
    return "single"
