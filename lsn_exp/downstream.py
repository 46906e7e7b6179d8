"""Downstream evaluation: does amplifying language t's neurons help or hurt tasks in t (self-language) and
in the other languages (cross-language)?

Task families (``taskindex.TASK_FAMILIES``; every family runs for every language it covers):
  xcopa       xcopa_local_<l>      11 langs   acc        lm-eval's xcopa format on the local copy
  xwinograd   xwinograd_local_<l>   6 langs   acc        lm-eval's partial scoring on the local copy
  include     include_base_44_<n>  13 langs   acc        lm-eval's own tasks; HF hub only (skipped offline)
  flores_mt   flores_mt_<l>        17 langs   chrf++ bleu lang_share empty_share   English -> l, greedy
  flores_ppl  flores_ppl_<l>       18 langs   ll_per_token ppl bits_per_byte   rolling log-likelihood
The local tasks live in lsn_exp/tasks/ and read the data root (TaskManager metadata ``data_root``).

A job scores the patched model on the selected tasks and reports, per task and metric, a MetricDelta
(lsn_exp.metrics.paired_delta); the DownstreamResult summarises self vs cross-language deltas.

The unpatched model's per-document outputs are cached in the CacheStore once per (model, task, limit,
split, prompt, task files and data files, versions) and reused by every patch. No lm-eval response cache
is used (``lmeval.run_tasks``): a cached response would belong to whatever patch was active when it was
written.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import zlib
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lsn_exp import data, lid, lmeval, metrics
from lsn_exp.data import MT_PROMPTS
from lsn_exp.engine import engine_of
from lsn_exp.errors import UserError
from lsn_exp.files import sha256_file
from lsn_exp.models import device_key
from lsn_exp.results import DownstreamResult, TaskScore
from lsn_exp.settings import EvalSettings
from lsn_exp.specs import Intervention, PatchSpec
from lsn_exp.taskindex import TASK_FAMILIES, TaskFamily
from lsn_exp.tracking import provenance

if TYPE_CHECKING:
    from lsn_exp.cache import CacheStore
    from lsn_exp.models import ModelHandle
    from lsn_exp.neuronset import NeuronSet

log = logging.getLogger(__name__)

DOWNSTREAM_VERSION = 4  # bump when requests, scoring, decoding or the cached unpatched outputs' layout change
UNPATCHED_KIND = "downstream_unpatched"
INCLUDE_HUB_ID = "CohereForAI/include-base-44"
LM_EVAL_METRIC = {"acc": "acc", "chrf++": "chrf++", "bleu": "bleu", "lang_share": "lang_share",
                  "empty_share": "empty_share", "bits_per_byte": "bits_per_byte"}  # ours -> lm-eval's (checked)


@dataclass(frozen=True)
class TaskRef:
    family: TaskFamily
    lang: str  # our code: the matrix row
    name: str  # lm-eval task (or group) name


def plan(settings_: EvalSettings) -> list[TaskRef]:
    """Every (family, task language) the settings select, in family then paper order; then every other
    ``eval.tasks`` name as one lm-eval task (its language from ``eval.task_langs`` or its name)."""
    ours = [TaskRef(family, code, family.task(code))
            for family in (TASK_FAMILIES[n] for n in settings_.families if n in TASK_FAMILIES)
            for code in family.langs() if settings_.langs is None or code in settings_.langs]
    return ours + [TaskRef(TaskFamily(name, "lm_eval", (), name, None, local=False), task_language(name, settings_),
                           name) for name in settings_.families if name not in TASK_FAMILIES]


def task_language(name: str, settings_: EvalSettings) -> str:
    """Our code for an lm-eval task's language: ``eval.task_langs``, else the last part of its name that is
    one of our codes or FLORES codes (xnli_fr -> fr, belebele_ind_Latn -> id); "" when none is."""
    if name in settings_.task_langs:
        return settings_.task_langs[name]
    by_flores = {lang.flores: code for code, lang in data.language_registry().items()}
    parts = name.split("_")
    for i in range(len(parts) - 1, -1, -1):
        for candidate in ("_".join(parts[i:i + 2]), parts[i]):
            code = candidate if candidate in data.LANG_ORDER else by_flores.get(candidate)
            if code:
                return code
    return ""


def scored_tokens(tokenizer, text: str) -> int:
    """Tokens DownstreamLM's rolling log-likelihood scores for ``text`` (all of them, BOS excluded)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- per-document outputs -----------------------------------------------------------------------------------

@dataclass
class DocOutputs:
    """One run's per-document outputs for one task, in document order (``keys`` align two runs)."""

    keys: list[str]
    tensors: dict[str, np.ndarray]  # float64/int64 [N]: correct (mc), match (mt), ll/n_tokens/n_bytes (ppl)
    texts: dict[str, list[str]] = field(default_factory=dict)  # mt: predictions, references
    lm_eval: dict[str, float] = field(default_factory=dict)  # lm-eval's own aggregates (a cross-check)

    @property
    def n(self) -> int:
        return len(self.keys)

    def stats(self, ref: TaskRef) -> dict:
        return metrics.metric_stats(ref.family.kind, ref.family.metrics, ref.lang, self.tensors, self.texts)


def outputs_from_samples(ref: TaskRef, results: dict, tokenizer) -> DocOutputs:
    """A task's per-document outputs from ``simple_evaluate(log_samples=True)`` results."""
    names = results.get("group_subtasks", {}).get(ref.name) or [ref.name]
    rows = sorted(((name, int(s["doc_id"]), s) for name in names for s in results["samples"].get(name, [])),
                  key=lambda r: (r[0], r[1]))
    if not rows:
        raise RuntimeError(f"lm-eval returned no samples for {ref.name}")
    keys = [f"{name}:{doc_id}" if len(names) > 1 else str(doc_id) for name, doc_id, _ in rows]
    agg = results.get("results", {}).get(ref.name) or results.get("groups", {}).get(ref.name) or {}
    lm_eval = {ours: float(agg[f"{theirs},none"]) for ours, theirs in LM_EVAL_METRIC.items()
               if isinstance(agg.get(f"{theirs},none"), (int, float))}
    samples = [s for _, _, s in rows]
    if ref.family.kind == "lm_eval":  # every metric lm-eval aggregates that each sample carries as a number
        names = [k.split(",")[0] for k in agg if "," in k and "_stderr" not in k and isinstance(agg[k], (int, float))]
        names = [m for m in names if all(isinstance(s.get(m), (int, float, bool)) for s in samples)]
        if not names:
            raise UserError(f"{ref.name}: no per-document numeric metric in lm-eval's samples (corpus metrics "
                            f"such as BLEU are not scored per document): lsn_exp cannot pair it")
        return DocOutputs(keys, {m: np.array([float(s[m]) for s in samples]) for m in names},
                          lm_eval={m: lm_eval_value for m, lm_eval_value in
                                   ((m, agg.get(f"{m},none")) for m in names) if isinstance(lm_eval_value, (int, float))})
    if ref.family.kind == "mc":
        return DocOutputs(keys, {"correct": np.array([float(s["acc"]) for s in samples])}, lm_eval=lm_eval)
    if ref.family.kind == "mt":
        texts = {"predictions": [s["chrf++"][0] for s in samples], "references": [s["chrf++"][1] for s in samples]}
        return DocOutputs(keys, {"match": np.array([float(s["lang_share"]) for s in samples])}, texts, lm_eval)
    tensors = {"ll": np.array([float(s["bits_per_byte"][0]) for s in samples]),
               "n_tokens": np.array([scored_tokens(tokenizer, s["doc"]["text"]) for s in samples], dtype=np.int64),
               "n_bytes": np.array([int(s["bits_per_byte"][1]) for s in samples], dtype=np.int64)}
    return DocOutputs(keys, tensors, lm_eval=lm_eval)


def mt_rows(name: str, patched: DocOutputs, unpatched: DocOutputs) -> list[list]:
    """Every translation of an MT task, unpatched and patched, with its language label (outputs.MT_OUTPUT_FIELDS;
    ``lid.identify``, restricted py3langid, as the task's lang_share)."""
    before, after = unpatched.texts["predictions"], patched.texts["predictions"]
    labels = lid.identify([*before, *after])
    return [[name, key, patched.texts["references"][i], b, labels[i], p, labels[len(before) + i]]
            for i, (key, b, p) in enumerate(zip(patched.keys, before, after))]


# --- the cached unpatched outputs ------------------------------------------------------------------------------

def _data_files(ref: TaskRef, root: Path | None, settings_: EvalSettings) -> list[Path]:
    if root is None or not ref.family.local:
        return []
    lang = data.languages([ref.lang])[0]
    if ref.family.name == "xcopa":
        return [root / "xcopa" / f"{lang.xcopa}.test.jsonl"]
    if ref.family.name == "xwinograd":
        return [root / "xwinograd" / f"{lang.xwinograd}.jsonl"]
    files = [data.flores_path(root, lang, settings_.flores_split)]
    if ref.family.kind == "mt":
        files.insert(0, data.flores_path(root, data.languages(["en"])[0], settings_.flores_split))
    return files


_file_sha256 = cache(sha256_file)  # a task's data files hash once per process


def _task_fingerprint(ref: TaskRef, root: Path | None, settings_: EvalSettings) -> dict:
    """What the task's documents and requests come from: its task files and data files (or the hub)."""
    if ref.family.kind == "lm_eval":  # lm-eval's own YAMLs (its version is in the key) or the user's directory
        return {"include_path": None if settings_.include_path is None else _tree_sha256(Path(settings_.include_path))}
    if not ref.family.local:
        return {"hub": INCLUDE_HUB_ID}
    task_dir = lmeval.TASKS_DIR / {"mc": ref.family.name + "_local"}.get(ref.family.kind, ref.family.name)
    digest = hashlib.sha256()
    for path in sorted(p for p in task_dir.iterdir() if p.suffix in (".yaml", ".py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    files = {p.name: _file_sha256(p) for p in _data_files(ref, root, settings_)} if root is not None else {"hub": True}
    return {"tasks": digest.hexdigest()[:16], "data": files}


def _tree_sha256(root: Path) -> str:
    """Every file under ``root`` (names and bytes): the user's task YAMLs, utils and local data."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def unpatched_spec(handle: ModelHandle, ref: TaskRef, root: Path | None, settings_: EvalSettings) -> dict:
    """The cache key of a task's unpatched outputs."""
    spec = {"model": handle.identity, "dtype": str(handle.model.dtype),
            **device_key(handle), "task": ref.name,
            "limit": settings_.limit_for(ref.family.name), "version": DOWNSTREAM_VERSION,
            "lm_eval": version("lm_eval"), "files": _task_fingerprint(ref, root, settings_)}
    if ref.family.kind in ("mt", "ppl"):
        spec["flores_split"] = settings_.flores_split
    if ref.family.kind == "mt":
        spec["mt_prompt"] = MT_PROMPTS[settings_.mt_prompt]
    return spec


def _outputs_from_entry(entry) -> DocOutputs:
    meta = entry.meta
    return DocOutputs(list(meta["keys"]), {k: v.numpy() for k, v in entry.tensors.items()},
                      dict(meta.get("texts") or {}), dict(meta.get("lm_eval") or {}))


# --- the evaluator ---------------------------------------------------------------------------------------------

class DownstreamEvaluator:
    """One LM and TaskManager for a model; the unpatched outputs loaded (or computed and cached) once;
    ``score(neurons, spec)`` runs the selected tasks under the patch and compares."""

    def __init__(self, handle: ModelHandle, settings: EvalSettings, data_root, store: CacheStore | None):
        self.handle, self.store = handle, store
        self.settings = replace(settings, batch_size=settings.batch_size or handle.batch_size)
        self.root = data.resolve_root(data_root)
        self.skipped: dict[str, str] = {}
        self.refs = plan(self.settings)
        if any(r.family.name == "include" for r in self.refs) and data.hub_offline():
            self._skip_include("it loads from the HF hub only ({hub}) and the hub is offline (HF_HUB_OFFLINE / "
                               "HF_DATASETS_OFFLINE); run online to score it")
            self.refs = [r for r in self.refs if r.family.name != "include"]
        self.lm = engine_of(handle).lm(self.settings.batch_size, rolling=True)
        self.manager = lmeval.task_manager(metadata={
            "data_root": str(self.root) if self.root else None, "mt_prompt": self.settings.mt_prompt,
            "flores_split": self.settings.flores_split})
        self._hub_manager = None
        self.unpatched_cached: dict[str, bool] = {}
        self.unpatched: dict[str, DocOutputs] = self._load_unpatched()

    def _skip_include(self, why: str) -> None:
        self.skipped["include"] = "INCLUDE skipped: " + why.format(hub=INCLUDE_HUB_ID)
        log.warning(self.skipped["include"])

    def _manager(self, local: bool):
        """Ours (lsn_exp/tasks), or lm-eval's own tasks plus ``eval.include_path``."""
        if local:
            return self.manager
        if self._hub_manager is None:
            self._hub_manager = lmeval.task_manager(include_defaults=True, extra_path=self.settings.include_path)
        return self._hub_manager

    def run(self, refs: list[TaskRef]) -> dict[str, DocOutputs]:
        """The model as it is now (patched or not) on ``refs``: one simple_evaluate per (source, limit)."""
        groups: dict[tuple[bool, int | None], list[TaskRef]] = {}
        for ref in refs:
            key = (ref.family.local, ref.family.kind == "lm_eval", self.settings.limit_for(ref.family.name))
            groups.setdefault(key, []).append(ref)
        outputs = {}
        for (local, _, limit), group in groups.items():
            try:
                results = lmeval.run_tasks(self.lm, [r.name for r in group], self._manager(local), limit=limit,
                                             log_samples=True, bootstrap_iters=0)
            except Exception as err:  # noqa: BLE001 - only the hub tasks may fail for want of a download
                if local:
                    raise
                if any(r.family.kind == "lm_eval" for r in group):
                    raise UserError(f"lm-eval could not run {', '.join(r.name for r in group)}: "
                                    f"{type(err).__name__}: {err}") from err
                self._skip_include(f"loading {{hub}} failed ({type(err).__name__}: {err})")
                continue
            outputs.update({ref.name: outputs_from_samples(ref, results, self.handle.tokenizer) for ref in group})
        return outputs

    def _load_unpatched(self) -> dict[str, DocOutputs]:
        """Each task's unpatched outputs from the cache, the missing ones scored in one run and cached (jobs that
        need them at once score them once: the others wait on the cache locks and load)."""
        if self.store is None:
            out = self.run(self.refs)
            self.unpatched_cached = {name: False for name in out}
        else:
            specs = {ref.name: unpatched_spec(self.handle, ref, self.root, self.settings) for ref in self.refs}
            entries = self.store.get_or_compute_many(UNPATCHED_KIND, specs, self._score_unpatched)
            out = {name: _outputs_from_entry(entry) for name, entry in entries.items()}
            self.unpatched_cached = {name: not entry.computed for name, entry in entries.items()}
        self.refs = [r for r in self.refs if r.name in out]  # include may drop out
        return out

    def _score_unpatched(self, names: list[str]) -> dict[str, tuple[dict, dict]]:
        refs = [r for r in self.refs if r.name in names]
        start = time.time()
        computed = self.run(refs)
        log.info("downstream unpatched outputs: %d tasks in %.1f s", len(computed), time.time() - start)
        return {ref.name: self._as_entry(ref, computed[ref.name]) for ref in refs if ref.name in computed}

    def _as_entry(self, ref: TaskRef, result: DocOutputs) -> tuple[dict, dict]:
        tensors = {k: torch.from_numpy(v) for k, v in result.tensors.items()}
        meta = {"keys": result.keys, "texts": result.texts, "lm_eval": result.lm_eval,
                "batch_size": self.settings.batch_size,
                "provenance": provenance(self.handle.identity, _data_files(ref, self.root, self.settings))}
        return tensors, meta

    def data_files(self) -> list[Path]:
        return sorted({p for r in self.refs for p in _data_files(r, self.root, self.settings)})

    def score(self, neurons: NeuronSet | None,
              spec: PatchSpec | Intervention | None) -> tuple[DownstreamResult, list]:
        """Every selected task under the engine's ``intervene(neurons, spec)`` (spec None: unpatched) vs the unpatched
        outputs; also the MT output rows (outputs.MT_OUTPUT_FIELDS)."""
        if getattr(spec, "prefix", ""):
            raise UserError("prompt baselines are scored on LSS and generation, not on downstream tasks")
        start = time.time()
        if spec is None:
            patched, patch_summary = self.run(self.refs), None
        else:
            with engine_of(self.handle).intervene(neurons, spec) as patch:
                patched, patch_summary = self.run(self.refs), patch.summary()
        seconds = time.time() - start
        target = spec.target if spec is not None else None
        tasks = {ref.name: self._task_score(ref, patched[ref.name], target) for ref in self.refs if ref.name in patched}
        result = DownstreamResult(target=target, patch=patch_summary, tasks=tasks, skipped=dict(self.skipped),
                                  settings=_settings_dict(self.settings), wall_time_s=round(seconds, 2),
                                  data_root=str(self.root) if self.root else "hf-hub")
        rows = [row for ref in self.refs if ref.family.kind == "mt" and ref.name in patched
                for row in mt_rows(ref.name, patched[ref.name], self.unpatched[ref.name])]
        return result, rows

    def _task_score(self, ref: TaskRef, now: DocOutputs, target: str | None) -> TaskScore:
        base = self.unpatched[ref.name]
        if now.keys != base.keys:
            raise RuntimeError(f"{ref.name}: the patched run scored other documents than the cached unpatched run")
        stats_now, stats_base = now.stats(ref), base.stats(ref)
        rng = np.random.default_rng([self.settings.seed, zlib.crc32(ref.name.encode())])
        deltas = {m: metrics.paired_delta(m, stats_now[m], stats_base[m], ref.lang, self.settings.bootstrap, rng)
                  for m in ref.family.metrics or stats_now}
        for metric, theirs in now.lm_eval.items():  # our scoring must agree with lm-eval's aggregate
            ours = deltas[metric].value
            if ours is not None and not math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-6):
                log.warning("%s %s: ours %.6f != lm-eval's %.6f", ref.name, metric, ours, theirs)
        return TaskScore(family=ref.family.name, lang=ref.lang, n=now.n, self_language=ref.lang == target,
                         metrics=deltas, unpatched_cached=self.unpatched_cached[ref.name],
                         bleu_tokenizer=metrics.bleu_tokenizer(ref.lang) if ref.family.kind == "mt" else None)


def evaluate_downstream(handle: ModelHandle, neurons: NeuronSet | None,
                        patch_spec: PatchSpec | Intervention | None, settings: EvalSettings,
                        data_root, store: CacheStore | None) -> tuple[DownstreamResult, list, list[Path]]:
    """A job: the patched model on ``eval.tasks`` for every task language, against the (cached) unpatched
    model. Returns the result, the MT output rows and the data files read."""
    evaluator = DownstreamEvaluator(handle, settings, data_root, store)
    result, rows = evaluator.score(neurons, patch_spec)
    return result, rows, evaluator.data_files()


def _settings_dict(s: EvalSettings) -> dict:
    return {"tasks": list(s.families), "langs": list(s.langs) if s.langs else "all", "limit": s.limit,
            "limits": dict(s.limits), "batch_size": s.batch_size, "mt_prompt": s.mt_prompt,
            "flores_split": s.flores_split, "bootstrap": s.bootstrap, "seed": s.seed,
            "bleu_tokenizers": {c: metrics.bleu_tokenizer(c) for c in ("ja", "th", "zh")}}
