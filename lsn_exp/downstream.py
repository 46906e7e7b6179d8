"""Downstream evaluation: does amplifying language t's neurons help or hurt tasks in t (self-language) and
in the other languages (cross-language)?

Task families (lm-eval tasks; every family runs for every language it covers, "task languages"):
  xcopa       xcopa_local_<l>      11 langs   acc        lm-eval's xcopa format on the local copy
  xwinograd   xwinograd_local_<l>   6 langs   acc        lm-eval's partial scoring on the local copy
  include     include_base_44_<n>  13 langs   acc        lm-eval's own tasks; HF hub only (skipped offline)
  flores_mt   flores_mt_<l>        17 langs   chrf++ bleu lang_share   English -> l, greedy, 50 tokens
  flores_ppl  flores_ppl_<l>       18 langs   ll_per_token ppl bits_per_byte   rolling log-likelihood
The local tasks live in lsn_exp/tasks/ and read the data root (TaskManager metadata ``data_root``).

A job (``evaluate_downstream``) scores the patched model on the selected tasks and reports, per task and
metric: value ± stderr, the unpatched value ± stderr, and the delta ± its paired stderr; then the
self-language delta (task language == patched language) and the mean cross-language delta per family and
metric. Mean metrics (acc, lang_share) get the analytic stderr (sample std / sqrt n, as lm-eval); corpus
metrics (chrF++, BLEU, perplexities) a bootstrap over documents, with the same resamples for the
patched and the unpatched run (paired delta). Every metric is a function of per-document statistics that
are summed (sacrebleu's sufficient statistics for chrF++ / BLEU), so scoring never depends on batching.

The unpatched model's outputs (per-document correctness, predictions, log-likelihoods) are cached in the
ArtifactStore once per (model, task, limit, split, prompt, task files and data files, versions) and reused
by every patch. No lm-eval response cache is used (``evaluate.run_tasks``: use_cache=None, no request
cache): a cached response would belong to whatever patch was active when it was written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsn_exp.errors import UserError
from lsn_exp.settings import FAMILIES, LANG_ORDER, MT_PROMPTS, EvalSettings, Family, eval_settings

if TYPE_CHECKING:
    from lsn_exp.artifacts import ArtifactStore
    from lsn_exp.identify import NeuronArtifact
    from lsn_exp.models import ModelHandle
    from lsn_exp.patch import PatchSpec

log = logging.getLogger(__name__)

DOWNSTREAM_VERSION = 3  # bump when requests, scoring or the cached baseline's layout change
BASELINE_KIND = "downstream_baseline"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
INCLUDE_HUB_ID = "CohereForAI/include-base-44"


MEAN_METRICS = ("acc", "lang_share", "empty_share")  # means of per-document values: analytic stderr
HIGHER_IS_BETTER = {"acc": True, "lang_share": True, "empty_share": False, "chrf++": True, "bleu": True,
                    "ll_per_token": True, "ppl": False, "bits_per_byte": False}
LM_EVAL_METRIC = {"acc": "acc", "chrf++": "chrf++", "bleu": "bleu", "lang_share": "lang_share",
                  "empty_share": "empty_share", "bits_per_byte": "bits_per_byte"}  # ours -> lm-eval's (checked)


# --- settings ---------------------------------------------------------------------------------------------

def settings(eval_cfg, handle: ModelHandle | None = None) -> EvalSettings:
    """``cfg.eval`` -> EvalSettings (lsn_exp.settings) with the batch size resolved for ``handle``."""
    parsed = eval_settings(eval_cfg)
    return replace(parsed, batch_size=parsed.batch_size or (handle.batch_size if handle is not None else 8))


@dataclass(frozen=True)
class TaskRef:
    family: Family
    lang: str  # our code: the matrix row
    name: str  # lm-eval task (or group) name


def plan(settings_: EvalSettings) -> list[TaskRef]:
    """Every (family, task language) the settings select, in family then paper order."""
    refs = []
    for name in settings_.families:
        family = FAMILIES[name]
        for code in family.langs():
            if settings_.langs is None or code in settings_.langs:
                refs.append(TaskRef(family, code, family.task(code)))
    return refs


# --- documents (the task utils call these) --------------------------------------------------------------

def _root(data_root) -> Path | None:
    from lsn_exp import data

    return data.resolve_root(str(data_root) if data_root else os.environ.get(data.DATA_ENV))


def _language(code: str):
    from lsn_exp import data

    return data.languages([code])[0]


def _read_jsonl(path: Path) -> list[dict]:
    from lsn_exp import data

    if not path.exists():
        raise UserError(f"{path} is missing: set data.root=DIR or {data.DATA_ENV}=DIR (a copy like ../shared/data)")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _hub_rows(what: str, path: str, name: str, split: str) -> list[dict]:
    from lsn_exp import data

    data.require_hub(what)
    from datasets import load_dataset

    return list(load_dataset(path, name, split=split))


def xcopa_docs(data_root, lang: str, split: str = "test") -> list[dict]:
    """XCOPA rows of our language ``lang`` (xcopa/<code>.<split>.jsonl), each with ``lang`` added."""
    code = _language(lang).xcopa
    if not code:
        raise UserError(f"XCOPA has no {lang}: it covers {' '.join(FAMILIES['xcopa'].langs())}")
    root = _root(data_root)
    rows = (_read_jsonl(root / "xcopa" / f"{code}.{split}.jsonl") if root is not None else
            _hub_rows("XCOPA", "cambridgeltl/xcopa", code, "validation" if split == "val" else split))
    return [{**row, "lang": lang} for row in rows]


XWINOGRAD_FIELDS = ("sentence", "option1", "option2", "answer")


def xwinograd_docs(data_root, lang: str) -> list[dict]:
    """XWinograd rows (sentence with "_", option1, option2, answer) of our language ``lang`` (ja -> jp)."""
    code = _language(lang).xwinograd
    if not code:
        raise UserError(f"XWinograd has no {lang}: it covers {' '.join(FAMILIES['xwinograd'].langs())}")
    root = _root(data_root)
    rows = (_read_jsonl(root / "xwinograd" / f"{code}.jsonl") if root is not None else
            _hub_rows("XWinograd", "Muennighoff/xwinograd", code, "test"))
    return [{**{k: row[k] for k in XWINOGRAD_FIELDS}, "lang": lang} for row in rows]


def flores_mt_docs(data_root, lang: str, split: str = "devtest", prompt: str = "untargeted") -> list[dict]:
    """English -> ``lang`` documents: source, target, the rendered prompt."""
    from lsn_exp import data

    if lang == "en" or lang not in LANG_ORDER:
        raise UserError(f"flores_mt translates English into one of {' '.join(FAMILIES['flores_mt'].langs())}, "
                        f"not {lang}")
    if prompt not in MT_PROMPTS:
        raise UserError(f"mt_prompt={prompt} is not allowed: use one of {', '.join(MT_PROMPTS)}")
    root = _root(data_root)
    target = _language(lang)
    sources = data.flores(root, _language("en"), split).sentences
    targets = data.flores(root, target, split).sentences
    assert len(sources) == len(targets), "FLORES files must be line-aligned"
    return [{"id": i, "source": s, "target": t, "lang": lang,
             "prompt": MT_PROMPTS[prompt].format(source=s, target_name=target.name)}
            for i, (s, t) in enumerate(zip(sources, targets))]


def flores_ppl_docs(data_root, lang: str, split: str = "devtest") -> list[dict]:
    from lsn_exp import data

    return [{"id": i, "text": s, "lang": lang}
            for i, s in enumerate(data.flores(_root(data_root), _language(lang), split).sentences)]


# --- translation metrics -------------------------------------------------------------------------------

@cache
def bleu_tokenizer(lang: str) -> str:
    """sacrebleu tokenizer for BLEU into ``lang``: zh -> 'zh'; ja -> 'ja-mecab' when MeCab is installed, else
    'char'; th -> 'flores200' when sentencepiece and its model are already on disk (never downloaded),
    else 'char'; every other language -> '13a' (sacrebleu's default)."""
    if lang == "zh":
        return "zh"
    if lang == "ja":
        return "ja-mecab" if _works("ja-mecab") else "char"
    if lang == "th":
        return "flores200" if _spm_model_on_disk("flores200") and _works("flores200") else "char"
    return "13a"


def _works(tokenize: str) -> bool:
    from sacrebleu.metrics import BLEU

    try:
        BLEU(tokenize=tokenize).corpus_score(["a b"], [["a b"]])
        return True
    except Exception:  # noqa: BLE001 - a missing optional dependency
        return False


def _spm_model_on_disk(key: str) -> bool:
    if importlib.util.find_spec("sentencepiece") is None:
        return False
    from sacrebleu.tokenizers.tokenizer_spm import SPM_MODELS
    from sacrebleu.utils import SACREBLEU_DIR

    return os.path.exists(os.path.join(SACREBLEU_DIR, "models", os.path.basename(SPM_MODELS[key]["url"])))


@cache
def _mt_metric(metric: str, lang: str):
    from sacrebleu.metrics import BLEU, CHRF

    if metric == "chrf++":
        return CHRF(word_order=2)
    if metric == "bleu":
        return BLEU(tokenize=bleu_tokenizer(lang))
    raise KeyError(metric)


def sentence_stats(metric: str, preds, refs, lang: str):
    """sacrebleu's per-sentence sufficient statistics, int64 [N, K]; their sum gives the corpus score."""
    import numpy as np

    stats = _mt_metric(metric, lang)._extract_corpus_statistics(list(preds), [list(refs)])
    return np.asarray(stats, dtype=np.int64).reshape(len(preds), -1)


def corpus_score(metric: str, preds, refs, lang: str) -> float:
    """Corpus chrF++ or BLEU (sacrebleu, one reference per sentence), the same as sacrebleu's corpus_score."""
    return _score_from_stats(metric, sentence_stats(metric, preds, refs, lang).sum(0), lang)


def _score_from_stats(metric: str, stats, lang: str) -> float:
    return float(_mt_metric(metric, lang)._compute_score_from_stats([int(x) for x in stats]).score)


def output_language(text: str) -> str:
    """py3langid's ISO 639-1 label of a model output ("-" when empty), as lsn_exp.generate labels text."""
    from lsn_exp.generate import detect_language

    return detect_language(text)


# --- the LM -------------------------------------------------------------------------------------------

def downstream_lm(handle: ModelHandle, batch_size: int | None = None):
    """``evaluate.DownstreamLM`` on ``handle.model``: rolling log-likelihoods given one BOS."""
    from lsn_exp import evaluate

    return evaluate.hflm(handle, batch_size, evaluate.DownstreamLM)


def scored_tokens(tokenizer, text: str) -> int:
    """Tokens DownstreamLM's rolling log-likelihood scores for ``text`` (all of them, BOS excluded)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- per-document outputs -> statistics -> metrics ------------------------------------------------------

@dataclass
class Outputs:
    """One run's per-document outputs for one task, in document order (``keys`` align two runs)."""

    keys: list[str]
    tensors: dict[str, Any]  # name -> float64/int64 numpy [N]
    texts: dict[str, list[str]] = field(default_factory=dict)  # mt: predictions, references
    lm_eval: dict[str, float] = field(default_factory=dict)  # lm-eval's own aggregates (a cross-check)

    @property
    def n(self) -> int:
        return len(self.keys)


def outputs_from_samples(ref: TaskRef, results: dict, tokenizer) -> Outputs:
    """A task's per-document outputs from ``simple_evaluate(log_samples=True)`` results."""
    import numpy as np

    names = results.get("group_subtasks", {}).get(ref.name) or [ref.name]
    rows = []
    for name in names:
        for sample in results["samples"].get(name, []):
            rows.append((name, int(sample["doc_id"]), sample))
    if not rows:
        raise RuntimeError(f"lm-eval returned no samples for {ref.name}")
    rows.sort(key=lambda r: (r[0], r[1]))
    keys = [f"{name}:{doc_id}" if len(names) > 1 else str(doc_id) for name, doc_id, _ in rows]
    agg = results.get("results", {}).get(ref.name) or results.get("groups", {}).get(ref.name) or {}
    lm_eval = {ours: float(agg[f"{theirs},none"]) for ours, theirs in LM_EVAL_METRIC.items()
               if isinstance(agg.get(f"{theirs},none"), (int, float))}
    samples = [s for _, _, s in rows]
    if ref.family.kind == "mc":
        return Outputs(keys, {"correct": np.array([float(s["acc"]) for s in samples])}, lm_eval=lm_eval)
    if ref.family.kind == "mt":
        preds = [s["chrf++"][0] for s in samples]
        refs_ = [s["chrf++"][1] for s in samples]
        match = np.array([float(s["lang_share"]) for s in samples])
        return Outputs(keys, {"match": match}, {"predictions": preds, "references": refs_}, lm_eval)
    ll = np.array([float(s["bits_per_byte"][0]) for s in samples])
    n_bytes = np.array([int(s["bits_per_byte"][1]) for s in samples], dtype=np.int64)
    n_tokens = np.array([scored_tokens(tokenizer, s["doc"]["text"]) for s in samples], dtype=np.int64)
    return Outputs(keys, {"ll": ll, "n_tokens": n_tokens, "n_bytes": n_bytes}, lm_eval=lm_eval)


def metric_stats(ref: TaskRef, out: Outputs) -> dict[str, Any]:
    """metric -> per-document statistics [N, K] whose column sums determine the metric (metric_value)."""
    import numpy as np

    ones = np.ones(out.n)
    kind = ref.family.kind
    if kind == "mc":
        return {"acc": np.c_[out.tensors["correct"], ones]}
    if kind == "mt":
        preds, refs_ = out.texts["predictions"], out.texts["references"]
        return {"chrf++": sentence_stats("chrf++", preds, refs_, ref.lang),
                "bleu": sentence_stats("bleu", preds, refs_, ref.lang),
                "lang_share": np.c_[out.tensors["match"], ones],
                "empty_share": np.c_[[float(p == "") for p in preds], ones]}
    stats = np.c_[out.tensors["ll"], out.tensors["n_tokens"], out.tensors["n_bytes"]]
    return {metric: stats for metric in ref.family.metrics}


def metric_value(metric: str, sums, lang: str) -> float:
    """A metric from its summed statistics (see metric_stats)."""
    if metric in MEAN_METRICS:
        return float(sums[0] / sums[1])
    if metric in ("chrf++", "bleu"):
        return _score_from_stats(metric, sums, lang)
    ll, n_tokens, n_bytes = (float(x) for x in sums)
    if metric == "ll_per_token":
        return ll / n_tokens
    if metric == "ppl":
        return math.exp(-ll / n_tokens)
    if metric == "bits_per_byte":
        return -ll / (n_bytes * math.log(2))
    raise KeyError(metric)


def compare(metric: str, patched, base, lang: str, n_boot: int, rng) -> dict:
    """value ± stderr for the patched and the unpatched statistics, and the delta ± its paired stderr."""
    import numpy as np

    n = len(patched)
    cell = {"value": metric_value(metric, patched.sum(0), lang), "base": metric_value(metric, base.sum(0), lang)}
    cell["delta"] = cell["value"] - cell["base"]
    if metric in MEAN_METRICS:
        x, y = patched[:, 0].astype(float), base[:, 0].astype(float)
        se = (lambda v: float(np.std(v, ddof=1) / math.sqrt(n))) if n > 1 else (lambda v: float("nan"))
        cell.update(stderr=se(x), base_stderr=se(y), delta_stderr=se(x - y))
    elif n_boot > 0 and n > 1:
        counts = np.stack([np.bincount(row, minlength=n) for row in rng.integers(0, n, size=(n_boot, n))])  # [B, n]
        vp = np.array([metric_value(metric, s, lang) for s in counts @ patched])
        vb = np.array([metric_value(metric, s, lang) for s in counts @ base])
        cell.update(stderr=float(np.std(vp, ddof=1)), base_stderr=float(np.std(vb, ddof=1)),
                    delta_stderr=float(np.std(vp - vb, ddof=1)))
    else:
        cell.update(stderr=float("nan"), base_stderr=float("nan"), delta_stderr=float("nan"))
    return {k: _num(v) for k, v in cell.items()}


# --- the evaluator ---------------------------------------------------------------------------------------

class DownstreamEvaluator:
    """One LM and TaskManager for a model; the unpatched outputs loaded (or computed and cached) once;
    ``score(artifact, spec)`` runs the selected tasks under the patch and compares."""

    def __init__(self, handle: ModelHandle, eval_cfg, data_root, store: ArtifactStore | None):
        from lsn_exp import evaluate

        self.handle, self.store = handle, store
        self.settings = settings(eval_cfg, handle)
        self.root = _root(data_root)
        self.skipped: dict[str, str] = {}
        refs = plan(self.settings)
        if any(not r.family.local for r in refs) and _hub_offline():
            self.skipped["include"] = (f"INCLUDE skipped: it loads from the HF hub only ({INCLUDE_HUB_ID}) and the "
                                       "hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); run online to score it")
            log.warning(self.skipped["include"])
            refs = [r for r in refs if r.family.local]
        self.refs = refs
        self.lm = downstream_lm(handle, self.settings.batch_size)
        self.manager = evaluate.task_manager(metadata={
            "data_root": str(self.root) if self.root else None, "mt_prompt": self.settings.mt_prompt,
            "flores_split": self.settings.flores_split})
        self._hub_manager = None
        self.baseline_cached: dict[str, bool] = {}
        self.baseline: dict[str, Outputs] = self._load_baseline()

    # -- running tasks --

    def _manager(self, local: bool):
        from lsn_exp import evaluate

        if local:
            return self.manager
        if self._hub_manager is None:
            self._hub_manager = evaluate.task_manager(include_defaults=True)
        return self._hub_manager

    def run(self, refs: list[TaskRef]) -> dict[str, Outputs]:
        """The model as it is now (patched or not) on ``refs``: one simple_evaluate per (source, limit)."""
        from lsn_exp import evaluate

        groups: dict[tuple[bool, int | None], list[TaskRef]] = {}
        for ref in refs:
            groups.setdefault((ref.family.local, self.settings.limit_for(ref.family.name)), []).append(ref)
        outputs = {}
        for (local, limit), group in groups.items():
            try:
                results = evaluate.run_tasks(self.lm, [r.name for r in group], self._manager(local), limit=limit,
                                             log_samples=True, bootstrap_iters=0)
            except Exception as err:  # noqa: BLE001 - only the hub tasks may fail for want of a download
                if local:
                    raise
                self.skipped["include"] = (f"INCLUDE skipped: loading {INCLUDE_HUB_ID} failed "
                                           f"({type(err).__name__}: {err})")
                log.warning(self.skipped["include"])
                continue
            for ref in group:
                outputs[ref.name] = outputs_from_samples(ref, results, self.handle.tokenizer)
        return outputs

    # -- the unpatched outputs: once per model and task settings, in the artifact cache --

    def baseline_spec(self, ref: TaskRef) -> dict:
        from importlib.metadata import version

        spec = {"model": self.handle.identity, "dtype": str(self.handle.model.dtype),
                "device": getattr(self.handle.device, "type", str(self.handle.device)), "task": ref.name,
                "limit": self.settings.limit_for(ref.family.name), "version": DOWNSTREAM_VERSION,
                "lm_eval": version("lm_eval"), "files": _fingerprint(ref, self.root, self.settings)}
        if ref.family.kind in ("mt", "ppl"):
            spec["flores_split"] = self.settings.flores_split
        if ref.family.kind == "mt":
            spec["mt_prompt"] = MT_PROMPTS[self.settings.mt_prompt]
        return spec

    def _load_baseline(self) -> dict[str, Outputs]:
        import torch

        from lsn_exp.tracking import provenance

        cached = {}
        if self.store is not None:
            for ref in self.refs:
                entry = self.store.load(BASELINE_KIND, self.baseline_spec(ref))
                if entry is not None:
                    cached[ref.name] = _outputs_from_entry(entry)
        missing = [r for r in self.refs if r.name not in cached]
        computed = {}
        if missing:
            start = time.time()
            computed = self.run(missing)
            log.info("downstream baseline: %d tasks in %.1f s", len(computed), time.time() - start)
        self.refs = [r for r in self.refs if r.name in cached or r.name in computed]  # include may drop out
        out = {}
        for ref in self.refs:
            if ref.name in cached:
                out[ref.name], self.baseline_cached[ref.name] = cached[ref.name], True
                continue
            result = computed[ref.name]
            if self.store is None:
                out[ref.name], self.baseline_cached[ref.name] = result, False
                continue
            tensors = {k: torch.from_numpy(v) for k, v in result.tensors.items()}
            meta = {"keys": result.keys, "texts": result.texts, "lm_eval": result.lm_eval,
                    "batch_size": self.settings.batch_size,
                    "provenance": provenance(self.handle.identity, _data_files(ref, self.root, self.settings))}
            entry = self.store.get_or_compute(BASELINE_KIND, self.baseline_spec(ref), lambda: (tensors, meta))
            out[ref.name], self.baseline_cached[ref.name] = _outputs_from_entry(entry), not entry.computed
        return out

    # -- one patched run --

    def score(self, artifact: NeuronArtifact | None, spec: PatchSpec | None, out_dir=None) -> dict:
        """Every selected task under ``Patch(handle, artifact, spec)`` (spec None: unpatched) vs the baseline."""
        import numpy as np

        from lsn_exp.patch import Patch

        start = time.time()
        if spec is None:
            patched, patch_summary, target = self.run(self.refs), None, None
        else:
            with Patch(self.handle, artifact, spec) as patch:
                patched = self.run(self.refs)
                patch_summary = patch.summary()
            target = spec.target
        seconds = time.time() - start
        tasks = {}
        for ref in self.refs:
            if ref.name not in patched:
                continue
            now, base = patched[ref.name], self.baseline[ref.name]
            if now.keys != base.keys:
                raise RuntimeError(f"{ref.name}: the patched run scored other documents than the cached baseline")
            stats_now, stats_base = metric_stats(ref, now), metric_stats(ref, base)
            rng = np.random.default_rng([self.settings.seed, zlib.crc32(ref.name.encode())])
            metrics = {m: compare(m, stats_now[m], stats_base[m], ref.lang, self.settings.bootstrap, rng)
                       for m in ref.family.metrics}
            for metric, theirs in now.lm_eval.items():  # our scoring must agree with lm-eval's aggregate
                ours = metrics[metric]["value"]
                if ours is not None and not math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-6):
                    log.warning("%s %s: ours %.6f != lm-eval's %.6f", ref.name, metric, ours, theirs)
            task = {"family": ref.family.name, "lang": ref.lang, "n": now.n, "self": ref.lang == target,
                    "metrics": metrics, "baseline_cached": self.baseline_cached[ref.name]}
            if ref.family.kind == "mt":
                task["bleu_tokenizer"] = bleu_tokenizer(ref.lang)
            tasks[ref.name] = task
        result = {"target": target, "patch": patch_summary, "tasks": tasks, "summary": summarize(tasks, target),
                  "skipped": dict(self.skipped), "settings": _settings_dict(self.settings),
                  "baseline_cached": dict(self.baseline_cached), "wall_time_s": round(seconds, 2),
                  "data_root": str(self.root) if self.root else "hf-hub",
                  "data_files": sorted({str(p) for r in self.refs for p in _data_files(r, self.root, self.settings)}),
                  "tables": {}}
        if out_dir is not None:
            result["tables"] = write_job_tables(result, patched, self.baseline, out_dir)
        return result


def evaluate_downstream(handle: ModelHandle, artifact: NeuronArtifact | None, patch_spec: PatchSpec | None, eval_cfg,
                        data_root, store: ArtifactStore | None, out_dir=None) -> dict:
    """A job: the patched model on ``eval.tasks`` for every task language, against the (cached) unpatched model.

    Returns plain data: ``tasks`` (task -> family, lang, n, self, metrics{m: value, stderr, base, base_stderr,
    delta, delta_stderr}), ``summary`` (family -> metric -> self / cross deltas), ``skipped`` (family ->
    reason), ``target``, ``patch``, ``settings``, ``baseline_cached``, ``wall_time_s``, ``data_files`` and,
    with ``out_dir``, ``tables`` (W&B key -> CSV path: downstream/tasks, downstream/mt_outputs).
    """
    return DownstreamEvaluator(handle, eval_cfg, data_root, store).score(artifact, patch_spec, out_dir)


def summarize(tasks: dict, target: str | None) -> dict:
    """family -> metric -> the self-language delta (and stderr) and the mean delta over the other languages."""
    import numpy as np

    out: dict[str, dict] = {}
    for task in tasks.values():
        for metric, cell in task["metrics"].items():
            entry = out.setdefault(task["family"], {}).setdefault(metric, {"_cross": [], "_base": [], "_value": []})
            if task["lang"] == target:
                entry.update(self=cell["delta"], self_stderr=cell["delta_stderr"], self_base=cell["base"],
                             self_value=cell["value"])
            elif cell["delta"] is not None:
                entry["_cross"].append(cell["delta"])
                entry["_base"].append(cell["base"])
                entry["_value"].append(cell["value"])
    for metrics in out.values():
        for entry in metrics.values():
            cross, base, value = entry.pop("_cross"), entry.pop("_base"), entry.pop("_value")
            entry.setdefault("self", None)
            entry["cross"] = _num(float(np.mean(cross))) if cross else None
            entry["cross_base"] = _num(float(np.mean(base))) if base else None
            entry["cross_value"] = _num(float(np.mean(value))) if value else None
            entry["n_cross"] = len(cross)
    return out


# --- tables, matrices, markdown -------------------------------------------------------------------------

TASK_FIELDS = ("task", "family", "lang", "self", "metric", "n", "value", "stderr", "base", "base_stderr", "delta",
               "delta_stderr")


def task_rows(result: dict) -> list[dict]:
    return [{"task": name, "family": t["family"], "lang": t["lang"], "self": t["self"], "metric": metric, "n": t["n"],
             **cell} for name, t in result["tasks"].items() for metric, cell in t["metrics"].items()]


def write_job_tables(result: dict, patched: dict[str, Outputs], base: dict[str, Outputs], out_dir) -> dict:
    """downstream_tasks.csv (one row per task and metric) and downstream_mt_outputs.csv (every translation,
    unpatched and patched, with its language label)."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {}
    path = out_dir / "downstream_tasks.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(TASK_FIELDS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(task_rows(result))
    tables["downstream/tasks"] = path
    mt = [name for name, t in result["tasks"].items() if FAMILIES[t["family"]].kind == "mt"]
    if mt:
        path = out_dir / "downstream_mt_outputs.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["task", "doc", "reference", "unpatched", "unpatched_lang", "patched", "patched_lang"])
            for name in mt:
                now, then = patched[name], base[name]
                for i, key in enumerate(now.keys):
                    b, p = then.texts["predictions"][i], now.texts["predictions"][i]
                    writer.writerow([name, key, now.texts["references"][i], b, output_language(b), p,
                                     output_language(p)])
        tables["downstream/mt_outputs"] = path
    return tables


METRIC_FMT = {"acc": ".3f", "lang_share": ".2f", "chrf++": ".1f", "bleu": ".1f", "ll_per_token": ".3f", "ppl": ".1f",
              "bits_per_byte": ".3f"}


def downstream_matrices(results: list[dict], out_dir, title: str = "") -> dict:
    """Matrices over a sweep: rows = task languages, columns = patched languages, cells = deltas.

    ``results``: per-job ``evaluate_downstream`` dicts (one patch per target language: pass one factor's jobs).
    Writes, per family and metric, downstream_<family>_<metric>.csv and .png, plus downstream_self_cross.csv
    (per target: self and mean cross delta of every family and metric). Returns ``matrices`` (key ->
    rows, cols, values), ``tables`` and ``images`` (W&B key -> path).
    """
    import csv

    from lsn_exp import plots

    by_target: dict[str, dict] = {}
    for result in results:
        target = result.get("target")
        if target is None:
            continue
        if target in by_target:
            raise UserError(f"two results patch toward {target}: build matrices from one factor's jobs at a time")
        by_target[target] = result
    cols = [c for c in LANG_ORDER if c in by_target] + sorted(c for c in by_target if c not in LANG_ORDER)
    cells: dict[tuple[str, str], dict[tuple[str, str], float | None]] = {}
    for col in cols:
        for task in by_target[col]["tasks"].values():
            for metric, cell in task["metrics"].items():
                cells.setdefault((task["family"], metric), {})[(task["lang"], col)] = cell["delta"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    matrices, tables, images = {}, {}, {}
    for (family, metric), values in sorted(cells.items(), key=lambda kv: (list(FAMILIES).index(kv[0][0]), kv[0][1])):
        rows = [r for r in LANG_ORDER if any((r, c) in values for c in cols)]
        grid = [[values.get((r, c)) for c in cols] for r in rows]
        key = f"{family}_{_slug(metric)}"
        matrices[f"{family}/{metric}"] = {"rows": rows, "cols": cols, "values": grid}
        path = out_dir / f"downstream_{key}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["task_lang\\patched", *cols])
            for r, row in zip(rows, grid):
                writer.writerow([r, *["" if v is None else f"{v:.6g}" for v in row]])
        tables[f"downstream/{key}/matrix"] = path
        numeric = [[float("nan") if v is None else v for v in row] for row in grid]
        images[f"downstream/{key}/heatmap"] = plots.heatmap(
            numeric, rows, cols, f"{title + ': ' if title else ''}Δ {family} {metric}",
            out_dir / f"downstream_{key}.png", fmt=METRIC_FMT.get(metric, ".2f"), cmap="coolwarm", center=0.0,
            xlabel="patched language", ylabel="task language")
    path = out_dir / "downstream_self_cross.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patched", "family", "metric", "self_delta", "self_stderr", "cross_delta", "n_cross"])
        for col in cols:
            for family, metrics in by_target[col]["summary"].items():
                for metric, s in metrics.items():
                    writer.writerow([col, family, metric, _fmt(s.get("self")), _fmt(s.get("self_stderr")),
                                     _fmt(s.get("cross")), s.get("n_cross")])
    tables["downstream/self_cross"] = path
    return {"matrices": matrices, "tables": tables, "images": images}


def markdown_table(result: dict) -> str:
    """A job's result as two markdown tables: every task and metric, then self vs cross per family."""
    target = result.get("target")
    lines = [f"Patched toward **{target}** ({(result.get('patch') or {}).get('patch', 'unpatched')}); "
             f"limit {result['settings']['limit']} (overrides {result['settings']['limits'] or 'none'}), "
             f"MT prompt {result['settings']['mt_prompt']}, FLORES {result['settings']['flores_split']}.", "",
             "| family | lang | metric | n | unpatched | patched | Δ (± paired se) |",
             "|---|---|---|---|---|---|---|"]
    for row in task_rows(result):
        f = METRIC_FMT.get(row["metric"], ".3f")
        lang = f"**{row['lang']}**" if row["self"] else row["lang"]
        lines.append(f"| {row['family']} | {lang} | {row['metric']} | {row['n']} "
                     f"| {_pm(row['base'], row['base_stderr'], f)} | {_pm(row['value'], row['stderr'], f)} "
                     f"| {_pm(row['delta'], row['delta_stderr'], f, sign=True)} |")
    lines += ["", "| family | metric | self Δ (task lang = patched) | mean cross Δ (other langs) | n cross |",
              "|---|---|---|---|---|"]
    for family, metrics in result["summary"].items():
        for metric, s in metrics.items():
            f = METRIC_FMT.get(metric, ".3f")
            self_ = "—" if s.get("self") is None else _pm(s["self"], s.get("self_stderr"), f, sign=True)
            cross = "—" if s.get("cross") is None else format(s["cross"], "+" + f)
            lines.append(f"| {family} | {metric} | {self_} | {cross} | {s['n_cross']} |")
    for family, reason in result.get("skipped", {}).items():
        lines += ["", f"{family}: {reason}"]
    return "\n".join(lines) + "\n"


# --- helpers ---------------------------------------------------------------------------------------------

def _hub_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _data_files(ref: TaskRef, root: Path | None, settings_: EvalSettings) -> list[Path]:
    if root is None or not ref.family.local:
        return []
    lang = _language(ref.lang)
    if ref.family.name == "xcopa":
        return [root / "xcopa" / f"{lang.xcopa}.test.jsonl"]
    if ref.family.name == "xwinograd":
        return [root / "xwinograd" / f"{lang.xwinograd}.jsonl"]
    files = [root / "flores200" / settings_.flores_split / f"{lang.flores}.txt"]
    if ref.family.kind == "mt":
        files.insert(0, root / "flores200" / settings_.flores_split / f"{_language('en').flores}.txt")
    return files


@cache
def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(ref: TaskRef, root: Path | None, settings_: EvalSettings) -> dict:
    """What the task's documents and requests come from: its task files and data files (or the hub)."""
    if not ref.family.local:
        return {"hub": INCLUDE_HUB_ID}
    task_dir = TASKS_DIR / {"mc": ref.family.name + "_local"}.get(ref.family.kind, ref.family.name)
    digest = hashlib.sha256()
    for path in sorted(p for p in task_dir.iterdir() if p.suffix in (".yaml", ".py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    files = {p.name: _sha(p) for p in _data_files(ref, root, settings_)} if root is not None else {"hub": True}
    return {"tasks": digest.hexdigest()[:16], "data": files}


def _outputs_from_entry(entry) -> Outputs:
    meta = entry.meta
    return Outputs(list(meta["keys"]), {k: v.numpy() for k, v in entry.tensors.items()}, dict(meta.get("texts") or {}),
                   dict(meta.get("lm_eval") or {}))


def _settings_dict(s: EvalSettings) -> dict:
    return {"tasks": list(s.families), "langs": list(s.langs) if s.langs else "all", "limit": s.limit,
            "limits": dict(s.limits), "batch_size": s.batch_size, "mt_prompt": s.mt_prompt,
            "flores_split": s.flores_split, "bootstrap": s.bootstrap, "seed": s.seed,
            "bleu_tokenizers": {c: bleu_tokenizer(c) for c in ("ja", "th", "zh")}}


def _num(value):
    return None if value is None or value != value else float(value)  # NaN -> None (JSON)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.6g}"


def _pm(value, stderr, fmt: str, sign: bool = False) -> str:
    if value is None:
        return "—"
    text = format(value, ("+" if sign else "") + fmt)
    return text if stderr is None else f"{text} ± {format(stderr, fmt)}"




def _slug(metric: str) -> str:
    return metric.replace("++", "pp").replace("+", "p")


