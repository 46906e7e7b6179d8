"""One job: cfg -> settings -> ModelHandle -> NeuronSet -> Patch -> typed results -> RunRecord.

A stage is a list of steps; each step reads the job context and returns a StageOutput (typed results,
tables, images, data files) that the job merges into the run record. The record is saved (atomically)
before anything is sent to W&B. Steps import the torch and lm-eval modules inside themselves, so
validation and dry runs load neither.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lsn_exp import data, models, outputs, preflight, resume
from lsn_exp.errors import UserError
from lsn_exp.files import cache_root, store_dir
from lsn_exp.results import LssResult, Skipped, StageOutput
from lsn_exp.resume import completed, config_hash
from lsn_exp.settings import JobSettings
from lsn_exp.specs import Intervention
from lsn_exp.tracking import WANDB_LOGGED, RunRecord, log_to_wandb, provenance

if TYPE_CHECKING:
    from lsn_exp.cache import CacheStore
    from lsn_exp.models import ModelHandle
    from lsn_exp.neuronset import NeuronSet

log = logging.getLogger(__name__)
CELL_LOCK = "cell.lock"  # held while a process works on the cell


@dataclass(frozen=True)
class Launch:
    """What a job takes from Hydra's launch: its output dir, the command line's overrides and its sweep group
    (``from_hydra``); a test or a script builds one itself."""

    run_dir: Path
    overrides: tuple[str, ...] = ()
    group: str = "single"  # the sweep dir's name in a multirun

    @classmethod
    def from_hydra(cls) -> Launch:
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
        return cls(Path(hydra_cfg.runtime.output_dir), tuple(hydra_cfg.overrides.task),
                   Path(hydra_cfg.sweep.dir).name if multirun else "single")


def search_command(overrides: tuple[str, ...]) -> str:
    """The command that runs the factor search ``factor=best`` needs: the job's ``overrides``, as a search."""
    dropped = ("factor=", "stage=", "lang=", "hydra.", "force=", "dry_run=")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(dropped)]
    return " ".join(["python -m lsn_exp stage=factor_search", *kept])


@dataclass
class JobContext:
    """What the steps of one job share: its settings (parsed once), the loaded model, the neuron set."""

    settings: JobSettings
    run_dir: Path
    model_handle: ModelHandle | None = None
    store: CacheStore | None = None
    neurons: NeuronSet | None = None
    neurons_key: str | None = None  # the neuron set's cache key (factor=best looks the search up by it)
    winners: dict = field(default_factory=dict)  # target -> the factor / method best resolved to (resume.winner)
    overrides: tuple[str, ...] = ()  # the command line's (Launch.overrides): factor=best names its search with them

    @property
    def data_root(self) -> Path | None:
        return self.settings.data_root

    def intervention(self, target: str | None = None) -> Intervention:
        """The neuron patch (and steering vector) toward ``target`` (default: the job's lang); factor=best reads
        the factor search, method=best the compare run's winner."""
        job, target = self.settings, target or self.settings.target
        if job.method == "best":
            from lsn_exp import compare

            entry, self.winners[target] = compare.best_method(job, self.model_handle.identity, self.store,
                                                              self.neurons_key, target)
            return compare.method_intervention(job, entry, target, self.data_root)
        patch_cfg, steer_cfg, prompt_cfg = job.intervention_config
        factor = job.factor
        if factor.kind == "best":
            from lsn_exp.factorsearch import resolve_best

            (patch_cfg, factor), self.winners[target] = resolve_best(
                self.model_handle.identity, self.store, patch_cfg, job.factor_search, self.neurons_key,
                search_command(self.overrides))
        return Intervention.from_settings(target, factor, patch_cfg, steer_cfg, prompt_cfg, self.data_root)


def load_model(ctx: JobContext) -> StageOutput:
    from lsn_exp.cache import CacheStore
    from lsn_exp.forkmap import processes_for

    job = ctx.settings
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)  # e.g. the CPUs SLURM gave this task
    # model.device=auto resolves here: forked scoring on a GPU fails before the load, not after it
    processes = processes_for(job.scoring_processes, models.resolve_device(job.model.device))
    ctx.model_handle = models.load(job.model, job.cache_dir)
    ctx.model_handle.scoring_processes = processes
    if job.engine.name == "vllm":
        ctx.model_handle.engine = start_vllm(ctx.model_handle, job)
    ctx.store = CacheStore.for_model(job.model.name, job.cache_dir)
    return StageOutput()


def start_vllm(handle, job: JobSettings):
    """engine=vllm: a vLLM engine beside the transformers model (lsn_exp.vllmengine; optional install)."""
    try:
        from lsn_exp import vllmengine  # imports vLLM: only when a job asks for it
    except ImportError as error:
        raise UserError(f"engine=vllm needs the optional vLLM install (`make install-vllm`, then run with "
                        f".venv-vllm/bin/python): {error}") from None
    return vllmengine.start(handle, job.model, job.engine, job.cache_dir)


def identify_neurons(ctx: JobContext) -> StageOutput:
    """The neuron set: recorded and selected (cached), or read from ``identify.from`` (a neuron folder)."""
    from lsn_exp import identify
    from lsn_exp import neurons as folders

    job, folder = ctx.settings, ctx.settings.neurons_from
    if folder:
        ctx.neurons, card = folders.load(folder, ctx.model_handle.identity)
        ctx.neurons_key, recorded, files = f"imported-{folders.card_digest(folder)}", False, []
        require_winners(ctx, ctx.neurons_key)
        neuron_dir = Path(folder).expanduser()
    else:
        if job.factor.kind == "best" or job.method == "best":  # before anything is recorded
            require_winners(ctx, identify.neurons_key(job.identify, ctx.model_handle, ctx.data_root, job.seed))
        found = identify.build(job.identify, ctx.model_handle, ctx.data_root, ctx.store, seed=job.seed,
                               force=job.force)
        ctx.neurons, ctx.neurons_key, recorded, files = found.neurons, found.key, found.recorded, found.data_files
        neuron_dir = folders.exported(ctx.store, found.key)
    tables, images = identify.write_outputs(ctx.neurons, ctx.run_dir)
    summary = {**identify.summary(ctx.neurons), "recorded": recorded, "neurons_key": ctx.neurons_key,
               "from": str(folder) if folder else None}
    return StageOutput({"identify": summary}, tables, images, list(files), {"neurons": neuron_dir})


def require_winners(ctx: JobContext, neurons_key: str) -> None:
    """factor=best and method=best: the factor search / compare run they read must exist (looked up by the neuron
    set's key), or the job stops here in one line, before identification records anything."""
    job, target = ctx.settings, ctx.settings.target
    if job.stage not in ("run", "generate", "lss", "lss_matrix", "downstream") or \
            (job.stage == "lss" and target not in data.LSS_LANGS):  # no intervention in this job
        return
    if job.method == "best":
        from lsn_exp import compare

        for each in job.lss.targets if job.stage == "lss_matrix" else (target,):
            compare.best_method(job, ctx.model_handle.identity, ctx.store, neurons_key, each)
    elif job.factor.kind == "best":
        from lsn_exp.factorsearch import resolve_best

        resolve_best(ctx.model_handle.identity, ctx.store, job.config["patch"], job.factor_search, neurons_key,
                     search_command(ctx.overrides))


def generate_demo(ctx: JobContext) -> StageOutput:
    """Greedy continuations of every source's prompts, unpatched and under the intervention: steering success
    (target language, not degenerate) and fluency (repetition, perplexity under the unpatched model)."""
    from lsn_exp import generate
    from lsn_exp.engine import engine_of

    target, spec = ctx.settings.target, ctx.intervention()
    gen_settings = ctx.settings.generate
    prompts = generate.prompt_sets(gen_settings, ctx.data_root)
    active = engine_of(ctx.model_handle).intervene(ctx.neurons, spec)
    summary, rows = generate.steering(ctx.model_handle, prompts, target, gen_settings, active, spec.prefix,
                                      store=ctx.store)
    for row in rows[:: max(1, len(rows) // 6)]:  # a few examples in the log
        print(f"[{row[0]}] {row[1]!r}\n  unpatched [{row[3]}] {row[2]!r}\n  {spec.describe()} [{row[6]}] {row[5]!r}")
    table = outputs.generations_csv(ctx.run_dir / "generations.csv", rows)
    result = {"patch": spec.describe(), "n_prompts": summary["all"]["patched"]["n"],
              "target_share_unpatched": summary["all"]["unpatched"]["target_share"],
              "target_share_patched": summary["all"]["patched"]["target_share"],
              "steering_success": summary["all"]["patched"]["steering_success"],
              "steering_success_ci": summary["all"]["patched"]["steering_success_ci"], "domain": gen_settings.domain,
              "by_source": summary, "steer_norm_ratio": active.summary().steer_norm_ratio,
              "generation_config": engine_of(ctx.model_handle).generation_config(gen_settings.max_new_tokens)}
    return StageOutput({"generate": result}, {"generate/continuations": table})


def lss_scores(ctx: JobContext) -> StageOutput:
    """LSS(s -> lang) for every mLAMA source s != lang, against the cached unpatched scores."""
    from lsn_exp import lss

    target = ctx.settings.target
    if target not in data.LSS_LANGS:
        return StageOutput({"lss": Skipped(f"mLAMA has no {target}: LSS covers {' '.join(data.LSS_LANGS)}")})
    result = lss.lss_for_target(ctx.model_handle, ctx.neurons, ctx.intervention(), ctx.settings.lss, ctx.data_root,
                                ctx.store)
    table = outputs.cells_csv(list(result.cells), ctx.run_dir / f"lss_{target}_cells.csv")
    return StageOutput({"lss": result}, {"lss/cells": table}, data_files=lss.data_files(ctx.data_root))


def lss_matrix(ctx: JobContext) -> StageOutput:
    """The full sources x targets matrix for this factor in one model load."""
    from lsn_exp import lss

    job = ctx.settings
    result = lss.lss_matrix(ctx.model_handle, ctx.neurons, ctx.intervention, job.lss, ctx.data_root, ctx.store)
    tables, images = outputs.lss_matrix_files(result, ctx.run_dir, f"LSS {job.model.name} factor={job.factor}")
    return StageOutput({"lss_matrix": result}, tables, images, lss.data_files(ctx.data_root))


def factor_search(ctx: JobContext) -> StageOutput:
    from lsn_exp import factorsearch, lss

    result, matrices = factorsearch.factor_search(ctx.model_handle, ctx.neurons, ctx.settings.config["patch"],
                                            ctx.settings.factor_search, ctx.data_root, ctx.store,
                                            neurons_key=ctx.neurons_key)
    images = {f"factor_search/{name}": outputs.lss_matrix_files(
        matrix, ctx.run_dir / "factor_search", f"LSS {name}", prefix=f"lss_{name}")[1][f"lss_{name}/heatmap"]
        for name, matrix in matrices.items()}
    print(f"factor search on {result.sample}:")
    for row in result.ranking:
        print(f"{row['rank']:>2}. {row['name']:<14} mean off-diagonal LSS {row['mean_offdiag_lss']:.3f} "
              f"(paper count {row['mean_offdiag_lss_paper']:.3f})")
    ranking = outputs.ranking_csv(result.ranking, ctx.run_dir)
    return StageOutput({"factor_search": result}, {"factor_search/ranking": ranking}, images,
                       lss.data_files(ctx.data_root))


def downstream(ctx: JobContext) -> StageOutput:
    """XCOPA, XWinograd, INCLUDE (online), FLORES MT and perplexity: patched vs cached unpatched."""
    from lsn_exp.downstream import evaluate_downstream

    result, mt_rows, files = evaluate_downstream(ctx.model_handle, ctx.neurons, ctx.intervention(),
                                                 ctx.settings.eval, ctx.data_root, ctx.store)
    return StageOutput({"downstream": result}, outputs.downstream_tables(result, mt_rows, ctx.run_dir),
                       data_files=files)


def compare_methods(ctx: JobContext) -> StageOutput:
    """Every method of ``compare.methods`` toward every ``compare.targets``: LSS, steering, fluency, XCOPA."""
    from lsn_exp import compare
    from lsn_exp.engine import engine_of

    def progress(rows: list[dict], curve: list[dict]) -> None:  # the targets done so far, rewritten after each
        outputs.write_csv(ctx.run_dir / "compare_partial.csv", list(compare.FIELDS),
                          [[row.get(k) for k in compare.FIELDS] for row in rows])
        outputs.write_csv(ctx.run_dir / "compare_search_partial.csv", list(compare.CURVE_FIELDS),
                          [[row.get(k) for k in compare.CURVE_FIELDS] for row in curve])

    rows, curve, tests = compare.compare(ctx.settings, ctx.model_handle, ctx.neurons, ctx.data_root, ctx.store,
                                         ctx.neurons_key, progress)
    title = f"{ctx.settings.model['name']}: methods side by side"
    tables, images = outputs.comparison_files(rows, compare.FIELDS, ctx.run_dir, title, tests, compare.TEST_FIELDS)
    curve_table, curve_images = outputs.search_curve_files(curve, compare.CURVE_FIELDS, ctx.run_dir, title)
    print((ctx.run_dir / "compare.md").read_text())
    decoded = engine_of(ctx.model_handle).generation_config(ctx.settings.generate.max_new_tokens)
    return StageOutput({"compare": {"rows": rows, "search": curve, "tests": tests, "generation_config": decoded}},
                       {**tables, **curve_table}, {**images, **curve_images})


STAGES: dict[str, list[Callable[[JobContext], StageOutput]]] = {
    "identify": [load_model, identify_neurons],
    "generate": [load_model, identify_neurons, generate_demo],
    "lss": [load_model, identify_neurons, lss_scores],
    "lss_matrix": [load_model, identify_neurons, lss_matrix],
    "factor_search": [load_model, identify_neurons, factor_search],
    "downstream": [load_model, identify_neurons, downstream],
    "run": [load_model, identify_neurons, generate_demo, lss_scores],
    "compare": [load_model, identify_neurons, compare_methods],
}


def run_job(cfg: DictConfig, launch: Launch) -> RunRecord | None:
    """One cell: ``cfg`` (a composed job config) run into ``launch.run_dir`` (``Launch.from_hydra()`` from the CLI)."""
    job = preflight.validate(cfg, STAGES)  # every config mistake, before anything loads (dry runs too)
    run_dir, method = launch.run_dir, job.method
    summary = (f"model={job.model.name} lang={job.target} factor={job.factor} stage={job.stage}"
               + ("" if method == "neurons" else f" method={method}"))
    record = RunRecord.start(cfg, run_dir)
    if job.dry_run:
        (run_dir / "dry_run.txt").write_text(summary + "\n")
        print(f"[dry run] {summary} -> {run_dir}")
        return None

    digest = config_hash(cfg)
    preflight.require_writable(cache_root(job.cache_dir), "cache dir",
                               "set cache_dir=<a writable dir> or LSN_CACHE")
    with FileLock(str(run_dir / CELL_LOCK)):  # a second process on this cell waits, then finds it complete
        return _run_cell(job, cfg.logger, launch, record, summary, digest)


def _run_cell(job: JobSettings, logger_cfg: DictConfig, launch: Launch, record: RunRecord, summary: str,
              digest: str) -> RunRecord | None:
    run_dir = record.run_dir
    if not job.force and completed(run_dir, digest, store_dir(job.model.name, job.cache_dir)):
        note_attempt(run_dir, "skipped: complete results exist for this config")
        log.info("%s | complete results exist (config %s): skipped; force=true recomputes", summary, digest)
        if logger_cfg.name == "wandb" and not (run_dir / WANDB_LOGGED).exists():  # killed while it logged
            log.info("%s | the W&B run was never completed: logging the saved results", summary)
            log_cell(RunRecord.load(run_dir), job, logger_cfg, launch.group)
        return None
    for stale in run_dir.glob(".*.tmp"):  # a temp file of a writer killed mid-write (we hold the cell lock)
        stale.unlink(missing_ok=True)
    note_attempt(run_dir, "started")
    started = time.time()
    ctx = JobContext(settings=job, run_dir=run_dir, overrides=launch.overrides)
    steps, data_files, step_times = STAGES[job.stage], [], {}
    for step in steps:
        log.info("step %s", step.__name__)
        step_start = time.time()
        out = step(ctx)
        step_times[step.__name__] = round(time.time() - step_start, 2)
        record.results.update(out.results)
        record.tables.update(out.tables)
        record.images.update(out.images)
        record.artifacts.update(out.artifacts)
        data_files += out.data_files
    record.results.update(stages_done=[step.__name__ for step in steps], wall_time_s=round(time.time() - started, 2),
                          step_times_s=step_times, config_hash=digest, code_version=resume.code_version(),
                          **({"winners": ctx.winners} if ctx.winners else {}))
    for line in ctx.store.summary() if ctx.store is not None else ():
        log.info(line)
    log.info("step write_results")
    record.provenance = provenance(ctx.model_handle.identity, data_files)
    record.provenance["data_root"] = str(ctx.data_root) if ctx.data_root else "hf-hub"
    path = record.save()
    note_attempt(run_dir, "completed")
    log.info("%s | %s | wrote %s | %s", summary, headline(record.results), path,
             " ".join(f"{name} {sec:.1f}s" for name, sec in step_times.items()))
    log_cell(record, job, logger_cfg, launch.group)
    return record


def log_cell(record: RunRecord, job: JobSettings, logger_cfg: DictConfig, group: str) -> None:
    """The cell's W&B run: id from the config hash and winners (resume.run_id), the grouping keys at the top."""
    model, method = job.model.name, job.method
    name = f"{model}-{job.target}-{job.factor}" + ("" if method == "neurons" else f"-{method}")
    keys = {"model": model, "lang": job.target, "factor": str(job.factor), "method": method, "stage": job.stage}
    log_to_wandb(record, logger_cfg, group=group, name=name, job_type=job.stage,
                 run_id=resume.run_id(record.results), keys=keys)


def note_attempt(run_dir: Path, what: str) -> None:
    """One line per attempt in attempts.log (started / completed / skipped): a cell's history, for people and tests."""
    with open(run_dir / "attempts.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}\n")


def headline(results: dict) -> str:
    """The job's last log line: what it found, in a few numbers."""
    found = results.get("identify", {})
    parts = [f"LAPE neurons={sum(found.get('lape_neurons', {}).values())}"  # summed over languages
             + (f" ({found['lape_union']} distinct)" if "lape_union" in found else "")]
    if isinstance(results.get("lss"), LssResult):
        parts.append(f"mean LSS {results['lss'].mean:.3f} (paper count {results['lss'].mean_paper:.3f})")
    if "lss_matrix" in results:
        matrix = results["lss_matrix"]
        parts.append(f"mean off-diagonal LSS {matrix.mean_offdiag:.3f} (paper count {matrix.mean_offdiag_paper:.3f})")
    if "generate" in results:
        gen = results["generate"]
        ppl = {run: gen["by_source"]["all"][run].get("ppl") for run in ("unpatched", "patched")}
        lo, hi = gen.get("steering_success_ci") or (float("nan"), float("nan"))
        parts.append(f"target-language continuations {gen['target_share_unpatched']:.2f} -> "
                     f"{gen['target_share_patched']:.2f} (fluent {gen.get('steering_success', 0):.2f} [{lo:.2f}, "
                     f"{hi:.2f}] of {gen.get('n_prompts')}; perplexity {_number(ppl['unpatched'])} -> "
                     f"{_number(ppl['patched'])})")
    if "downstream" in results:
        for family, metrics in results["downstream"].summary().items():
            metric, cell = next(iter(metrics.items()))  # each family's first metric: acc, chrF++, ll/token
            parts.append(f"{family} {metric} Δ self {_signed(cell.get('self'))} cross {_signed(cell.get('cross'))}")
    parts.append(f"{results.get('wall_time_s')} s")
    return " | ".join(parts)


def _number(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _signed(value) -> str:
    return "—" if value is None else f"{value:+.3f}"
