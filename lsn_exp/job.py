"""One job: cfg -> ModelHandle -> NeuronArtifact -> Patch -> Evaluation -> RunRecord.

A stage is a list of steps; each step reads the job context and adds results, tables and images
to the run record. The record is saved (atomically) before anything is sent to W&B.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lsn_exp import data, settings
from lsn_exp.patch import Factor, parse_factor
from lsn_exp.tracking import RESULTS_FILE, RunRecord, log_to_wandb, provenance

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    cfg: DictConfig
    factor: Factor
    run_dir: Path
    record: RunRecord
    data_root: Path | None
    handle: Any = None
    store: Any = None
    artifact: Any = None
    data_files: list = field(default_factory=list)

    def patch_spec(self, target: str | None = None):
        """The patch toward ``target`` (default: the job's lang); factor=best reads the factor search."""
        from lsn_exp.patch import PatchSpec

        patch_cfg, factor = self.cfg.patch, self.factor
        if factor.kind == "best":
            from lsn_exp.search import resolve_best

            patch_cfg, factor = resolve_best(self.handle.identity, self.store, self.cfg.patch, self.cfg.lss,
                                             self.record.results["identify"]["artifact_key"], search_command())
        return PatchSpec.from_config(patch_cfg, factor, target or self.cfg.lang.code)

    def patch(self, target: str | None = None):
        from lsn_exp.patch import Patch

        return Patch(self.handle, self.artifact, self.patch_spec(target))

    def add_outputs(self, result: dict) -> None:
        self.record.tables.update(result.pop("tables", {}))
        self.record.images.update(result.pop("images", {}))
        self.data_files += [Path(p) for p in result.pop("data_files", [])]


def load_model(ctx: JobContext) -> None:
    from lsn_exp import models
    from lsn_exp.artifacts import ArtifactStore

    threads = settings.threads(ctx.cfg.threads)
    if threads:
        import torch

        torch.set_num_threads(threads)  # e.g. the CPUs SLURM gave this task
    ctx.handle = models.load(ctx.cfg.model, ctx.cfg.cache_dir)
    ctx.store = ArtifactStore(models.cache_root(ctx.cfg.cache_dir) / "artifacts" / ctx.cfg.model.name)


def identify_neurons(ctx: JobContext) -> None:
    from lsn_exp import identify

    result = identify.build(ctx.cfg.identify, ctx.handle, ctx.data_root, ctx.store, seed=int(ctx.cfg.seed),
                            force=bool(ctx.cfg.force))
    ctx.artifact = result.artifact
    ctx.data_files += result.data_files
    ctx.record.results["identify"] = {**identify.summary(result.artifact), "recorded": result.recorded,
                                      "artifact_key": result.key}
    tables, images = identify.write_outputs(result.artifact, ctx.run_dir)
    ctx.add_outputs({"tables": tables, "images": images})


def generate_demo(ctx: JobContext) -> None:
    """Greedy continuations of neutral English prompts, unpatched and patched, with detected language."""
    from lsn_exp import generate

    target = ctx.cfg.lang.code
    patch = ctx.patch()
    before = generate.generate_labelled(ctx.handle)
    after = generate.generate_labelled(ctx.handle, patch=patch)
    path = ctx.run_dir / "generations.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "unpatched", "unpatched_lang", "patched", "patched_lang"])
        for b, a in zip(before, after):
            writer.writerow([b.prompt, b.text, b.label, a.text, a.label])
            print(f"{b.prompt!r}\n  unpatched [{b.label}] {b.text!r}\n  {patch.spec.describe()} [{a.label}] {a.text!r}")
    ctx.record.tables["generate/continuations"] = path
    ctx.record.results["generate"] = {"patch": patch.spec.describe(), "n_prompts": len(before),
                                      "target_share_unpatched": generate.share_in(before, target),
                                      "target_share_patched": generate.share_in(after, target)}


def lss_scores(ctx: JobContext) -> None:
    """LSS(s -> lang) for every mLAMA source s != lang, against the cached unpatched baseline."""
    from lsn_exp import lss

    target = ctx.cfg.lang.code
    if target not in lss.LSS_LANGS:
        ctx.record.results["lss"] = {"skipped": f"mLAMA has no {target}: LSS covers {' '.join(lss.LSS_LANGS)}"}
        return
    result = lss.lss_for_target(ctx.handle, ctx.artifact, ctx.patch_spec(), ctx.cfg.lss, ctx.data_root, ctx.store,
                                out_dir=ctx.run_dir)
    ctx.add_outputs(result)
    ctx.record.results["lss"] = {**result, "mean": result["mean_lss"], "mean_paper": result["mean_lss_paper"]}


def lss_matrix(ctx: JobContext) -> None:
    """The full sources x targets matrix for this factor in one model load."""
    from lsn_exp import lss

    result = lss.lss_matrix(ctx.handle, ctx.artifact, ctx.patch_spec, ctx.cfg.lss, ctx.data_root, ctx.store,
                            out_dir=ctx.run_dir, title=f"LSS {ctx.cfg.model.name} factor={ctx.factor}")
    ctx.add_outputs(result)
    result.pop("cells", None)
    ctx.record.results["lss_matrix"] = result


def factor_search(ctx: JobContext) -> None:
    from lsn_exp import search

    result = search.factor_search(ctx.handle, ctx.artifact, ctx.cfg.patch, ctx.cfg.lss, ctx.data_root, ctx.store,
                                  out_dir=ctx.run_dir, artifact_key=ctx.record.results["identify"]["artifact_key"])
    ctx.add_outputs(result)
    ctx.record.results["factor_search"] = result
    print(f"factor search on {result['sample']}:")
    for row in result["ranking"]:
        print(f"{row['rank']:>2}. {row['name']:<14} mean off-diagonal LSS {row['mean_offdiag_lss']:.3f} "
              f"(paper count {row['mean_offdiag_lss_paper']:.3f})")


def downstream(ctx: JobContext) -> None:
    """XCOPA, XWinograd, INCLUDE (online), FLORES MT and perplexity: patched vs cached unpatched."""
    from lsn_exp.downstream import evaluate_downstream

    result = evaluate_downstream(ctx.handle, ctx.artifact, ctx.patch_spec(), ctx.cfg.eval, ctx.data_root,
                                 ctx.store, out_dir=ctx.run_dir)
    ctx.add_outputs(result)
    ctx.record.results["downstream"] = result


STAGES: dict[str, list[Callable[[JobContext], None]]] = {
    "identify": [load_model, identify_neurons],
    "generate": [load_model, identify_neurons, generate_demo],
    "lss": [load_model, identify_neurons, lss_scores],
    "lss_matrix": [load_model, identify_neurons, lss_matrix],
    "factor_search": [load_model, identify_neurons, factor_search],
    "downstream": [load_model, identify_neurons, downstream],
    "run": [load_model, identify_neurons, generate_demo, lss_scores],
}


def run_job(cfg: DictConfig) -> RunRecord | None:
    settings.validate(cfg, STAGES)  # every config mistake, before anything loads (dry runs too)
    factor = parse_factor(cfg.factor)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = f"model={cfg.model.name} lang={cfg.lang.code} factor={factor} stage={cfg.stage}"
    record = RunRecord.start(cfg, run_dir)
    if cfg.dry_run:
        (run_dir / "dry_run.txt").write_text(summary + "\n")
        print(f"[dry run] {summary} -> {run_dir}")
        return None

    digest = config_hash(cfg)
    if not cfg.force and completed(run_dir, digest):
        note_attempt(run_dir, "skipped: complete results exist for this config")
        log.info("%s | complete results exist (config %s): skipped; force=true recomputes", summary, digest)
        return None
    note_attempt(run_dir, "started")
    started = time.time()
    ctx = JobContext(cfg=cfg, factor=factor, run_dir=run_dir, record=record,
                     data_root=data.resolve_root(cfg.data.root))
    steps = STAGES[cfg.stage]
    for step in steps:
        step(ctx)
    record.results["stages_done"] = [step.__name__ for step in steps]
    record.results["wall_time_s"] = round(time.time() - started, 2)
    record.results["config_hash"] = digest
    record.provenance = provenance(ctx.handle.identity, ctx.data_files)
    record.provenance["data_root"] = str(ctx.data_root) if ctx.data_root else "hf-hub"
    path = record.save()
    note_attempt(run_dir, "completed")
    log.info("%s | %s | wrote %s", summary, headline(record.results), path)
    log_to_wandb(record, cfg.logger, group=sweep_group(), name=f"{cfg.model.name}-{cfg.lang.code}-{factor}",
                 job_type=cfg.stage)
    return record


# Settings that cannot change a cell's results: a cell finished on one machine is not recomputed on another.
IGNORED_FOR_RESUME = ("force", "dry_run", "logger", "threads", "cache_dir")


def config_hash(cfg: DictConfig) -> str:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    kept = {k: v for k, v in resolved.items() if k not in IGNORED_FOR_RESUME}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed(run_dir: Path, digest: str) -> bool:
    path = run_dir / RESULTS_FILE
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text())["results"].get("config_hash") == digest
    except (ValueError, KeyError):
        return False


def note_attempt(run_dir: Path, what: str) -> None:
    """One line per attempt in attempts.log: the resume marker the report and tests read."""
    with open(run_dir / "attempts.log", "a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}\n")


def headline(results: dict) -> str:
    found = results.get("identify", {})
    parts = [f"LAPE neurons={sum(found.get('lape_neurons', {}).values())}"  # summed over languages
             + (f" ({found['lape_union']} distinct)" if "lape_union" in found else "")]
    if isinstance(results.get("lss"), dict) and "mean" in results["lss"]:
        parts.append(f"mean LSS {results['lss']['mean']:.3f} (paper count {results['lss']['mean_paper']:.3f})")
    if "lss_matrix" in results:
        matrix = results["lss_matrix"]
        parts.append(f"mean off-diagonal LSS {matrix['mean_offdiag']:.3f} "
                     f"(paper count {matrix['mean_offdiag_paper']:.3f})")
    if "generate" in results:
        gen = results["generate"]
        parts.append(f"target-language continuations {gen['target_share_unpatched']:.2f} -> "
                     f"{gen['target_share_patched']:.2f}")
    for family, metrics in results.get("downstream", {}).get("summary", {}).items():
        metric, cell = next(iter(metrics.items()))  # each family's first metric: acc, chrF++, ll/token
        parts.append(f"{family} {metric} Δ self {_signed(cell.get('self'))} cross {_signed(cell.get('cross'))}")
    parts.append(f"{results.get('wall_time_s')} s")
    return " | ".join(parts)


def _signed(value) -> str:
    return "—" if value is None else f"{value:+.3f}"


def search_command() -> str:
    """The command that runs the factor search ``factor=best`` needs: this job's overrides, as a search."""
    dropped = ("factor=", "stage=", "lang=", "hydra.", "force=", "dry_run=")
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(dropped)]
    return " ".join(["python -m lsn_exp stage=factor_search", *overrides])


def sweep_group() -> str:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        return Path(hydra_cfg.sweep.dir).name
    return "single"
