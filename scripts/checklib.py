"""What scripts/gpu_check.py and scripts/bf16_table.py share: a job's config composed in-process, a fresh
cache beside the converted models, stages that fail alone, LSS means with fact-bootstrap CIs, the machine's name,
markdown."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "disabled"), ("TOKENIZERS_PARALLELISM", "false"),
                     ("TQDM_DISABLE", "1")):  # before tqdm is imported: it reads TQDM_* then
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from lsn_exp import CONF_DIR, REPO_ROOT, files, job, metrics, preflight  # noqa: E402
from lsn_exp.results import mean_over  # noqa: E402
from lsn_exp.settings import JobSettings

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # roofline.py, bench_record.py


def composed(*overrides: str) -> JobSettings:
    """The job's settings for ``overrides`` (as ``python -m lsn_exp ...`` composes and validates them)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    return preflight.validate(cfg, job.STAGES)


def fresh_cache(root: Path) -> Path:
    """A new cache dir under ``root`` for artifacts (recordings, neuron sets, unpatched scores), whose converted
    models (and GGUF downloads) are the usual cache's: nothing cached before is reused but the weights."""
    cache = Path(root) / f"cache-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    cache.mkdir(parents=True)
    usual = files.cache_root(None)
    for name in ("models", "gguf"):
        (usual / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(usual / name)
    return cache


def load_job(settings: JobSettings, run_dir: Path) -> job.JobContext:
    """A job's context after its load_model step (the model on model.device in model.dtype)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = job.JobContext(settings=settings, run_dir=run_dir)
    job.load_model(ctx)
    return ctx


def identify_timed(ctx: job.JobContext) -> dict:
    """The job's identify step on ``ctx``, timed: tokens, seconds, tokens/s and the LAPE set's size."""
    synchronize(ctx.model_handle.device)
    start = time.perf_counter()
    job.identify_neurons(ctx)
    synchronize(ctx.model_handle.device)
    seconds = time.perf_counter() - start
    tokens = int(sum(ctx.neurons.meta.get("tokens", [])))
    distinct, summed = lape_size(ctx.neurons)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "lape_distinct": distinct, "lape_summed": summed, "languages": len(ctx.neurons.languages)}


def lape_size(neurons) -> tuple[int, int]:
    """(distinct neurons in any language's LAPE set, neurons summed over languages)."""
    lape = neurons.masks["lape"]
    return int(lape.any(dim=0).sum()), int(lape.sum())


def lss_mean(cells, n_boot: int = 1000) -> dict:
    """Mean LSS over ``cells`` (our count and the paper's) with 95% CIs that resample the facts the cells share."""
    ci = metrics.fact_bootstrap(cells, n_boot) or {}
    return {"lss": mean_over(cells, "lss"), "lss_ci": list(ci.get("lss", (float("nan"),) * 2)),
            "lss_paper": mean_over(cells, "lss_paper"), "lss_paper_ci": list(ci.get("lss_paper", (float("nan"),) * 2)),
            "cells": len(cells)}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: str) -> dict:
    """The processor (lscpu's model name, bf16 flags), the card, torch and CUDA versions."""
    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pass
    name = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), name)
    except (OSError, subprocess.SubprocessError):
        pass
    out = {"cpu": name, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": device}
    if torch.device(device).type == "cuda":
        out.update(card=torch.cuda.get_device_name(device), cudnn=torch.backends.cudnn.version())
    return out


class Report:
    """Rows (model, stage, what, value, ok); a stage that raises adds one failed row and the next one runs."""

    def __init__(self, budget_s: float | None = None):
        self.rows: list[dict] = []
        self.started, self.budget_s = time.time(), budget_s

    def stage(self, model: str, stage: str, fn) -> object:
        """Run ``fn()`` -> (rows as (what, value, ok), result); returns the result, or None when it failed."""
        if self.budget_s is not None and time.time() - self.started > self.budget_s:
            self.rows.append(self._row(model, stage, "skipped", f"past the {self.budget_s:.0f} s budget", None))
            return None
        start = time.time()
        print(f"--- {model}: {stage}", flush=True)
        try:
            found, result = fn()
        except Exception as exc:  # one stage's failure is a row; the others still run
            traceback.print_exc()
            self.rows.append(self._row(model, stage, "error", f"{type(exc).__name__}: {exc}"[:300], False))
            return None
        self.rows += [self._row(model, stage, what, value, ok) for what, value, ok in found]
        self.rows.append(self._row(model, stage, "stage seconds", round(time.time() - start, 1), None))
        return result

    @staticmethod
    def _row(model, stage, what, value, ok) -> dict:
        return {"model": model, "stage": stage, "what": what, "value": value, "ok": ok}

    def failed(self, stage: str | None = None) -> list[dict]:
        return [r for r in self.rows if r["ok"] is False and (stage is None or r["stage"] == stage)]

    def markdown(self) -> str:
        mark = {True: "yes", False: "**NO**", None: ""}
        return table(["model", "stage", "what", "value", "ok"],
                     [[r["model"], r["stage"], r["what"], r["value"], mark[r["ok"]]] for r in self.rows])


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(shown(c) for c in row) + " |" for row in rows])
