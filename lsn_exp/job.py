"""One job: cfg -> ModelHandle -> NeuronArtifact -> Patch -> Evaluation -> RunRecord."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lsn_exp import data
from lsn_exp.errors import UserError
from lsn_exp.patch import parse_factor
from lsn_exp.tracking import RunRecord, log_to_wandb, provenance

log = logging.getLogger(__name__)

STAGES = ("run", "identify")


def run_job(cfg: DictConfig) -> RunRecord | None:
    factor = parse_factor(cfg.factor)
    if cfg.stage not in STAGES:
        raise UserError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = f"model={cfg.model.name} lang={cfg.lang.code} factor={factor} stage={cfg.stage}"
    record = RunRecord.start(cfg, run_dir)
    if cfg.dry_run:
        (run_dir / "dry_run.txt").write_text(summary + "\n")
        print(f"[dry run] {summary} -> {run_dir}")
        return None

    started = time.time()
    data_root = data.resolve_root(cfg.data.root)
    from lsn_exp import identify, models
    from lsn_exp.artifacts import ArtifactStore

    handle = models.load(cfg.model, cfg.cache_dir)
    store = ArtifactStore(models.cache_root(cfg.cache_dir) / "artifacts" / cfg.model.name)
    ident = identify.build(cfg.identify, handle, data_root, store, seed=int(cfg.seed), force=bool(cfg.force))
    record.results["identify"] = {**identify.summary(ident.artifact), "recorded": ident.recorded,
                                  "artifact_key": ident.key}
    tables, images = identify.write_outputs(ident.artifact, run_dir)
    record.tables.update(tables)
    record.images.update(images)
    record.results["stages_done"] = ["load_model", "identify"]
    record.results["wall_time_s"] = round(time.time() - started, 2)
    record.provenance = provenance(handle.identity, ident.data_files)
    record.provenance["data_root"] = str(data_root) if data_root else "hf-hub"
    path = record.save()
    log.info("%s | %s | wrote %s", summary, headline(record.results), path)
    log_to_wandb(record, cfg.logger, group=sweep_group(), name=f"{cfg.model.name}-{cfg.lang.code}-{factor}",
                 job_type=cfg.stage)
    return record


def headline(results: dict) -> str:
    lape = results.get("identify", {}).get("lape_neurons", {})
    return f"LAPE neurons total={sum(lape.values())} | {results.get('wall_time_s')} s"


def sweep_group() -> str:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        return Path(hydra_cfg.sweep.dir).name
    return "single"
