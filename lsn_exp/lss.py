"""LSS (Language Steering Shift): does amplifying target-language neurons move mLAMA answers toward t?

For a fact i, a source language s and a target t (prompt in s, objects in s and t):
    Δ_i = log P(obj_t | prompt_s) − log P(obj_s | prompt_s)        summed continuation log-probs
    LSS(s→t) = (1/N) Σ_i 1[Δ_i(patched toward t) − Δ_i(unpatched) > tol]
A strict win rate: a no-op scores exactly 0, a random perturbation about 0.5 (when tol is tiny).
Cell statistics live in lsn_exp.metrics, the facts and prompts in lsn_exp.data, the files in lsn_exp.outputs.

One lm-eval task ``lss_<source>`` per source language (lsn_exp/tasks/lss/): each document is one fact, the
source prompt and, as choices, its object in all 15 languages, so one run gives the unpatched log-probs
for every target at once. Those unpatched scores depend only on the model and the sample: cached once per
(model, sample, source, object language) and reused for every target and factor; a job toward one target
scores only the two columns it needs. Scoring goes through ``evaluate.LsnHFLM`` (each prompt runs once and
its continuations are read from its KV cache).

Batch layout: requests are deduplicated and grouped by prompt, so the cached unpatched scores and a patched
run are batched differently, which moves a score by ~1e-6..1e-4 nats in fp32. A win therefore needs a
shift above ``lss.tol`` (auto: 1e-3 nats for fp32), and every cell reports how many facts lie within the
tolerance. In bf16/fp16 the same change of layout moves a long object's score by up to 1.6 nats
(Gemma-3-270M), so 16-bit models score their unpatched requests in the patched run's own layout
(``paired_layout``): a no-op is then exactly 0, and the 16-bit tolerance (5e-2) only has to separate real
shifts from bf16's resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from lsn_exp import data, evaluate, metrics
from lsn_exp.data import LSS_LANGS
from lsn_exp.errors import UserError
from lsn_exp.patch import PatchSpec
from lsn_exp.results import LssMatrix, LssResult
from lsn_exp.settings import LssSettings, lss_settings
from lsn_exp.steer import Intervention, intervene
from lsn_exp.tracking import provenance

if TYPE_CHECKING:
    from lsn_exp.artifacts import ArtifactStore
    from lsn_exp.identify import NeuronArtifact
    from lsn_exp.models import ModelHandle

log = logging.getLogger(__name__)

LSS_VERSION = 3  # bump when prompts, scoring or the cached unpatched scores' layout change
UNPATCHED_KIND = "lss_unpatched"


@dataclass(frozen=True)
class LssRequests:
    """The lss_<source> requests of one sample, built once: [fact][object language] -> lm-eval Instance."""

    instances: dict[str, list[list]]  # source -> [fact][lang] -> Instance
    continuations: dict[str, list[list[str]]]  # source -> [fact][lang] -> the object as a continuation
    fact_ids: list[str]
    sample_hash: dict[str, str]  # source -> sha256 of its documents (part of the unpatched scores' key)

    @classmethod
    def build(cls, settings: LssSettings, sources: tuple[str, ...], root, exclude_n_facts=None,
              prompt_prefix: str = "") -> LssRequests:
        manager = evaluate.task_manager(metadata={"data_root": str(root), "n_facts": settings.n_facts,
                                                  "seed": settings.seed, "exclude_n_facts": exclude_n_facts,
                                                  "prompt_prefix": prompt_prefix})
        tasks = manager.load([f"lss_{s}" for s in sources])["tasks"]
        instances, continuations, hashes, fact_ids = {}, {}, {}, None
        for source in sources:
            docs = list(tasks[f"lss_{source}"].eval_docs)
            grid = [[None] * len(LSS_LANGS) for _ in docs]
            for inst in evaluate.build_instances(tasks[f"lss_{source}"]):
                doc = docs[inst.doc_id]
                assert inst.args == (doc["prompt"], doc["choices"][inst.idx]), (inst.args, doc)
                grid[inst.doc_id][inst.idx] = inst
            ids = [d["fact_id"] for d in docs]
            fact_ids = ids if fact_ids is None else fact_ids
            assert ids == fact_ids, "every lss_<source> task must hold the same facts in the same order"
            instances[source], continuations[source] = grid, [list(d["choices"]) for d in docs]
            blob = json.dumps([[d["fact_id"], d["prompt"], d["choices"]] for d in docs], ensure_ascii=False)
            hashes[source] = hashlib.sha256(blob.encode()).hexdigest()
        return cls(instances, continuations, list(fact_ids or []), hashes)


class UnpatchedScores:
    """log P(obj_l | prompt_s) of the unpatched model: ``columns[s][:, l]``, each (source, object language)
    column loaded from the artifact cache or scored once, when a target first needs it (``ensure``)."""

    def __init__(self, handle: ModelHandle, lm, requests: LssRequests, settings: LssSettings, batch_size: int,
                 store: ArtifactStore | None, data_files):
        self.handle, self.lm, self.requests, self.settings = handle, lm, requests, settings
        self.batch_size, self.store, self.data_files = batch_size, store, data_files
        self.n = len(requests.fact_ids)
        self.columns = {s: np.full((self.n, len(LSS_LANGS)), np.nan) for s in requests.instances}
        self.cached: dict[str, bool] = {}  # source -> every column in use came from the cache

    def spec(self, source: str, lang: str) -> dict:
        return {"model": self.handle.identity, "dtype": str(self.handle.model.dtype),
                "device": getattr(self.handle.device, "type", str(self.handle.device)), "source": source,
                "object_lang": lang, "n_facts": self.settings.n_facts, "seed": self.settings.seed,
                "sample": self.requests.sample_hash[source], "lss_version": LSS_VERSION, "lm_eval": version("lm_eval")}

    def ensure(self, targets) -> None:
        """Fill ``columns[s][:, l]`` for every source s and l in {s} ∪ targets: a job toward one target scores 2
        objects per prompt, a matrix all 15 in one batched call. Jobs that need the same columns at once score
        them once: the others wait on the cache locks and load."""
        wanted = [(s, lang) for s in self.columns for lang in LSS_LANGS
                  if (lang == s or lang in targets) and np.isnan(self.columns[s][:, LSS_LANGS.index(lang)]).all()]
        if not wanted:
            return
        if self.store is None:
            entries = {pair: (tensors, False) for pair, (tensors, _) in self._score(wanted).items()}
        else:
            found = self.store.get_or_compute_many(UNPATCHED_KIND, {pair: self.spec(*pair) for pair in wanted},
                                                   self._score)
            entries = {pair: (entry.tensors, not entry.computed) for pair, entry in found.items()}
        for (source, lang), (tensors, cached) in entries.items():
            self.columns[source][:, LSS_LANGS.index(lang)] = tensors["loglik"].numpy()
            self.cached[source] = self.cached.get(source, True) and cached

    def _score(self, missing: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[dict, dict]]:
        insts = [self.requests.instances[s][i][LSS_LANGS.index(lang)] for s, lang in missing for i in range(self.n)]
        start = time.time()
        ll = np.asarray(evaluate.loglikelihoods(self.lm, insts, disable_tqdm=False), dtype=np.float64)
        log.info("LSS unpatched scores: %d requests (%d source x object columns) in %.1f s", len(insts), len(missing),
                 time.time() - start)
        meta = {"fact_ids": self.requests.fact_ids, "provenance": provenance(self.handle.identity, self.data_files),
                "batch_size": self.batch_size,
                "what": "log P(object in object_lang | source prompt), summed over continuation tokens, per fact"}
        return {pair: ({"loglik": torch.from_numpy(column.copy())}, meta)
                for pair, column in zip(missing, ll.reshape(len(missing), self.n))}

    def paired(self, target: str, keep: dict, insts: list) -> np.ndarray:
        """16-bit models: unpatched log-probs [n, 2] of exactly the requests a patched run toward ``target``
        scores, in the same order and batches (cached per model, sample, sources and target)."""
        spec = {**self.spec(next(iter(keep)), target), "source": list(keep), "batch_size": self.batch_size,
                "sample": [self.requests.sample_hash[source] for source in keep], "paired_layout": True}

        def compute():
            ll = evaluate.loglikelihoods(self.lm, insts, disable_tqdm=False)
            return {"loglik": torch.tensor(ll, dtype=torch.float64)}, {"sources": list(keep), "target": target}

        if self.store is None:
            return compute()[0]["loglik"].numpy().reshape(-1, 2)
        tensors = self.store.get_or_compute(UNPATCHED_KIND, spec, compute).tensors
        return np.asarray(tensors["loglik"].numpy(), dtype=np.float64).reshape(-1, 2)


def paired_layout(dtype) -> bool:
    """In bf16/fp16 a change of batch layout moves a long object's summed log-prob by up to ~1.6 nats
    (Gemma-3-270M, scripts/bf16_check.py), far above any usable tolerance; the shared unpatched columns
    (15 or 3 objects per prompt) are then replaced by an unpatched run of the patched run's own requests."""
    return str(dtype).replace("torch.", "") not in ("float32", "float64")


class LssEvaluator:
    """One model load, one HFLM, the requests built once, the unpatched scores shared by every patch.

    ``score(artifact, spec)`` patches toward ``spec.target`` and returns LSS(s→t) for every source s ≠ t.
    ``exclude_n_facts`` holds out the reporting sample of that size (a factor search's sample).
    """

    def __init__(self, handle: ModelHandle, lss_cfg, data_root, store: ArtifactStore | None,
                 sources: tuple[str, ...] | None = None, exclude_n_facts: int | str | None = None):
        self.handle = handle
        self.settings = lss_settings(lss_cfg, handle.model.dtype)
        self.batch_size = self.settings.batch_size or handle.batch_size
        self.sources = tuple(sources or self.settings.sources)
        root = data.mlama_root(data_root)
        mlama = data.read_mlama(root)
        self.mlama_summary, self.data_files = mlama.summary(), list(mlama.files)
        self.lm = evaluate.hflm(handle, self.batch_size)
        self.root, self.exclude_n_facts = root, exclude_n_facts
        self.requests = LssRequests.build(self.settings, self.sources, root, exclude_n_facts)
        self._prefixed: dict[str, LssRequests] = {}  # prompt prefix -> the same sample with prefixed prompts
        self.fact_ids, self.n = self.requests.fact_ids, len(self.requests.fact_ids)
        self.unpatched = UnpatchedScores(handle, self.lm, self.requests, self.settings, self.batch_size, store,
                                         self.data_files)

    def paired_layout(self) -> bool:
        return paired_layout(self.handle.model.dtype)

    def _requests_toward(self, target: str, prefix: str = "") -> tuple[dict[str, list[int]], list, list]:
        """Per source s ≠ target: the facts whose two objects differ, and their [obj_s, obj_t] requests in order,
        plain and with ``prefix`` before every prompt (a prompt baseline; the same requests when it is empty)."""
        if prefix and prefix not in self._prefixed:
            self._prefixed[prefix] = LssRequests.build(self.settings, self.sources, self.root, self.exclude_n_facts,
                                                       prefix)
        t = LSS_LANGS.index(target)
        keep, plain, prefixed = {}, [], []
        for source in (s for s in self.sources if s != target):
            s = LSS_LANGS.index(source)
            keep[source] = [i for i, row in enumerate(self.requests.continuations[source]) if row[t] != row[s]]
            for requests, out in ((self.requests, plain), (self._prefixed.get(prefix, self.requests), prefixed)):
                for i in keep[source]:
                    out += [requests.instances[source][i][s], requests.instances[source][i][t]]
        return keep, plain, prefixed

    def deltas(self, artifact: NeuronArtifact, spec: PatchSpec | Intervention):
        """Per source s ≠ t: the shift Δ(patched toward t) − Δ(unpatched) of every sampled fact, float64 [N];
        NaN where the two objects are the same string (a win is impossible there, so it is not scored).
        Returns (shifts, patch summary, patched seconds, requests); the patched requests of all sources go to
        lm-eval in one batched call."""
        target = spec.target
        if target not in LSS_LANGS:
            raise UserError(f"lang={target} is not an LSS language: LSS covers {' '.join(LSS_LANGS)}")
        t = LSS_LANGS.index(target)
        keep, insts, scored = self._requests_toward(target, getattr(spec, "prefix", ""))
        unpatched = self.unpatched.paired(target, keep, insts) if self.paired_layout() else None
        if unpatched is None:
            self.unpatched.ensure([target])
        start = time.time()
        with intervene(self.handle, artifact, spec) as patch:
            ll = np.asarray(evaluate.loglikelihoods(self.lm, scored, disable_tqdm=False), dtype=np.float64)
            ll = ll.reshape(-1, 2)  # [requests / 2, 2]: log P(obj_s), log P(obj_t)
            patch_summary = patch.summary()
        seconds = time.time() - start
        shifts, offset = {}, 0
        for source, idx in keep.items():
            rows = slice(offset, offset + len(idx))  # [n, 2]: log P(obj_s), log P(obj_t)
            if unpatched is not None:
                base_delta = unpatched[rows, 1] - unpatched[rows, 0]
            else:
                base = self.unpatched.columns[source][idx]  # [n, 15]
                base_delta = base[:, t] - base[:, LSS_LANGS.index(source)]
            offset += len(idx)
            shifts[source] = np.full(self.n, np.nan)
            shifts[source][idx] = (ll[rows, 1] - ll[rows, 0]) - base_delta
        return shifts, patch_summary, seconds, len(insts)

    def score(self, artifact: NeuronArtifact, spec: PatchSpec | Intervention) -> LssResult:
        """LSS(s→t) for every source s ≠ t = spec.target, scored under ``intervene(handle, artifact, spec)``."""
        shifts, patch_summary, seconds, n_requests = self.deltas(artifact, spec)
        s = self.settings
        cells = tuple(metrics.lss_cell(source, spec.target, shift, tol=s.tol, n_boot=s.bootstrap, seed=s.seed)
                      for source, shift in shifts.items())
        return LssResult(target=spec.target, patch=patch_summary, cells=cells, tol=self.settings.tol, n_facts=self.n,
                         fact_ids=list(self.fact_ids), requests=n_requests, wall_time_s=round(seconds, 2),
                         unpatched_cached=dict(self.unpatched.cached), data=self.mlama_summary)


def data_files(data_root) -> list:
    """The mLAMA files LSS reads (for provenance)."""
    return list(data.read_mlama(data.mlama_root(data_root)).files)


def lss_for_target(handle: ModelHandle, artifact: NeuronArtifact, spec: PatchSpec | Intervention, lss_cfg, data_root,
                   store: ArtifactStore | None) -> LssResult:
    """A job with ``lang=t``: LSS(s→t) for every source s ≠ t (``lss.sources``)."""
    return LssEvaluator(handle, lss_cfg, data_root, store).score(artifact, spec)


def lss_matrix(handle: ModelHandle, artifact: NeuronArtifact, spec_for: Callable[[str], PatchSpec | Intervention],
               lss_cfg,
               data_root, store: ArtifactStore | None, evaluator: LssEvaluator | None = None) -> LssMatrix:
    """The sources x targets LSS matrix in one model load: the unpatched scores once, one patched run per target.

    ``spec_for(target)`` gives the patch toward that target.
    """
    evaluator = evaluator or LssEvaluator(handle, lss_cfg, data_root, store)
    sources, targets = list(evaluator.sources), list(evaluator.settings.targets)
    if not evaluator.paired_layout():  # 16-bit: each target's unpatched run is paired with its patched run
        evaluator.unpatched.ensure(targets)  # every column in one batched call (15 objects share each prompt)
    cells, per_target, seconds = [], {}, 0.0
    for target in targets:
        result = evaluator.score(artifact, spec_for(target))
        seconds += result.wall_time_s
        per_target[target] = {"mean_lss": result.mean, "mean_lss_paper": result.mean_paper,
                              "patch": result.patch.patch, "neurons": result.patch.neurons}
        cells += result.cells
        log.info("LSS toward %s: mean %.3f (paper count %.3f) over %d sources (%.1f s)", target, result.mean,
                 result.mean_paper, len(result.cells), result.wall_time_s)
    return LssMatrix(sources=sources, targets=targets, cells=tuple(cells), tol=evaluator.settings.tol,
                     n_facts=evaluator.n, fact_ids=list(evaluator.fact_ids), per_target=per_target,
                     n_weakest=evaluator.settings.weakest, unpatched_cached=dict(evaluator.unpatched.cached),
                     data=evaluator.mlama_summary, patched_wall_time_s=round(seconds, 2))
