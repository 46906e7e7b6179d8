"""LSS (Language Steering Shift): does amplifying target-language neurons move mLAMA answers toward t?

For a fact i, a source language s and a target t (prompt in s, objects in s and t):
    Δ_i = log P(obj_t | prompt_s) − log P(obj_s | prompt_s)        summed continuation log-probs
    LSS(s→t) = (1/N) Σ_i 1[Δ_i(patched toward t) − Δ_i(unpatched) > tol]
A strict win rate: a no-op scores exactly 0, a random perturbation about 0.5 (when tol is tiny).
Cell statistics live in lsn_exp.metrics, the facts and prompts in lsn_exp.data, the files in lsn_exp.outputs.

Two numbers per cell. ``lss`` (ours): a win needs a shift above ``tol``, facts whose two objects are the same
string are skipped, and ja/zh/th put no space between prompt and object. ``lss_paper``: the paper's rule and
prompt format on our sample (tauimbz/lang-task-neuron, intervention_dod.py at c59e5dc: ``calculate_logprob``
scores ``prompt + " " + object`` in every language; ``HF_calculate_answer`` (DOD_NINT / DOD_INT) takes
log P(obj_t) − log P(obj_s) unpatched and patched; ``eval_dod`` counts ``diff > 0`` over all facts, so a
same-string fact, whose difference is exactly 0 both times, is a non-win). Where the paper's format differs
from ours (the sources whose separator is not a space: ja, zh, th), its requests are scored beside ours in
the same runs; elsewhere both numbers read the same requests. Our prompt is the template cut at [Y]; the
paper removes " [Y]" from the template of its hub copy (inayarhmns/MLAMA-dod-185, not read offline).

One lm-eval task ``lss_<source>`` per source language (lsn_exp/tasks/lss/): each document is one fact, the
source prompt and, as choices, its object in all 15 languages (and in the paper's format). Scoring goes
through ``lmeval.LsnHFLM`` (each prompt runs once and its continuations are read from its KV cache).

Batch layout: a score depends on how its request is batched (padding, which continuations share a prompt):
~1e-6..1e-4 nats in fp32, up to 1.6 nats for a long object in bf16 (Gemma-3-270M, scripts/bf16_check.py).
So the unpatched requests are scored exactly as the patched run scores them (``UnpatchedScores.paired``):
the same requests in the same order, and in whole rows (``lmeval.whole_rows``) where the patch takes a
test-time statistic (``Patch.reads_whole_rows``) and so forces them on the patched run. A no-op of any kind
then shifts no fact at all, in every dtype. That unpatched run depends only on the model, the sample, the
target and the layout: cached once and reused for every factor. The tolerance (``lss.tol``, auto: 1e-3
nats in fp32, 5e-2 in 16 bits: bf16's resolution) is our bar for a real shift, not a margin for layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from importlib.metadata import version
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from lsn_exp import data, lmeval, metrics
from lsn_exp.data import LSS_LANGS
from lsn_exp.engine import engine_of
from lsn_exp.errors import UserError
from lsn_exp.models import device_key
from lsn_exp.results import LssMatrix, LssResult, PatchSummary
from lsn_exp.settings import LssSettings
from lsn_exp.specs import Intervention, PatchSpec
from lsn_exp.tracking import provenance

if TYPE_CHECKING:
    from lsn_exp.cache import CacheStore
    from lsn_exp.models import ModelHandle
    from lsn_exp.neuronset import NeuronSet

log = logging.getLogger(__name__)

LSS_VERSION = 4  # bump when prompts, scoring or the cached unpatched scores' layout change
UNPATCHED_KIND = "lss_unpatched"


@dataclass(frozen=True)
class LssRequests:
    """The lss_<source> requests of one sample, built once: [fact][object language] -> lm-eval Instance."""

    instances: dict[str, list[list]]  # source -> [fact][lang] -> Instance
    continuations: dict[str, list[list[str]]]  # source -> [fact][lang] -> the object as a continuation
    fact_ids: list[str]
    sample_hash: dict[str, str]  # source -> sha256 of its documents (part of the unpatched scores' key)
    paper: LssRequests | None = None  # the paper's format, for the sources where it differs from ours

    @classmethod
    def build(cls, settings: LssSettings, sources: tuple[str, ...], root, exclude_n_facts=None,
              prompt_prefix: str = "", skip_n_facts: int = 0) -> LssRequests:
        manager = lmeval.task_manager(metadata={"data_root": str(root), "n_facts": settings.n_facts,
                                                  "seed": settings.seed, "exclude_n_facts": exclude_n_facts,
                                                  "prompt_prefix": prompt_prefix, "skip_n_facts": skip_n_facts})
        tasks = manager.load([f"lss_{s}" for s in sources])["tasks"]
        instances, continuations, hashes, fact_ids = {}, {}, {}, None
        paper: tuple[dict, dict, dict] = ({}, {}, {})  # the paper-format instances, continuations, hashes
        for source in sources:
            docs = list(tasks[f"lss_{source}"].eval_docs)
            grid = [[None] * len(LSS_LANGS) for _ in docs]
            for inst in lmeval.build_instances(tasks[f"lss_{source}"]):
                doc = docs[inst.doc_id]
                assert inst.args == (doc["prompt"], doc["choices"][inst.idx]), (inst.args, doc)
                grid[inst.doc_id][inst.idx] = inst
            ids = [d["fact_id"] for d in docs]
            fact_ids = ids if fact_ids is None else fact_ids
            assert ids == fact_ids, "every lss_<source> task must hold the same facts in the same order"
            instances[source], continuations[source] = grid, [list(d["choices"]) for d in docs]
            hashes[source] = _docs_hash(docs, "choices")
            if any(d["paper_choices"] != d["choices"] for d in docs):
                paper[0][source] = [[replace(inst, arguments=(inst.args[0], docs[inst.doc_id]["paper_choices"][
                    inst.idx])) for inst in row] for row in grid]
                paper[1][source] = [list(d["paper_choices"]) for d in docs]
                paper[2][source] = _docs_hash(docs, "paper_choices")
        ids = list(fact_ids or [])
        return cls(instances, continuations, ids, hashes, cls(*paper[:2], ids, paper[2]) if paper[0] else None)


def _docs_hash(docs: list[dict], choices: str) -> str:
    """sha256 of a source's facts, prompts and ``choices`` (our continuations or the paper's)."""
    blob = json.dumps([[d["fact_id"], d["prompt"], d[choices]] for d in docs], ensure_ascii=False)
    return hashlib.sha256(((choices + ":" if choices != "choices" else "") + blob).encode()).hexdigest()


@dataclass(frozen=True)
class LssShifts:
    """One patched run's per-fact shifts, float64 [N] per source (NaN: the two objects are the same string)."""

    ours: dict[str, np.ndarray]  # source -> shifts of our requests
    paper: dict[str, np.ndarray]  # source -> shifts of the paper-format requests (ours where they are the same)
    patch: PatchSummary
    seconds: float  # the patched run
    requests: int  # requests of the patched run


class UnpatchedScores:
    """The unpatched model's scores. ``paired``: exactly a patched run's requests in its layout (what LSS
    compares with). ``columns[s][:, l]`` = log P(obj_l | prompt_s), each (source, object language) column
    loaded from the cache or scored once (``ensure``: 15 objects share a prompt; benchmarks)."""

    def __init__(self, handle: ModelHandle, lm, requests: LssRequests, settings: LssSettings, batch_size: int,
                 store: CacheStore | None, data_files):
        self.handle, self.lm, self.requests, self.settings = handle, lm, requests, settings
        self.batch_size, self.store, self.data_files = batch_size, store, data_files
        self.n = len(requests.fact_ids)
        self.columns = {s: np.full((self.n, len(LSS_LANGS)), np.nan) for s in requests.instances}
        self.cached: dict[str, bool] = {}  # source -> every unpatched score in use came from the cache

    def spec(self, source: str, lang: str) -> dict:
        return {"model": self.handle.identity, "dtype": str(self.handle.model.dtype),
                **device_key(self.handle), "source": source,
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
        ll = np.asarray(lmeval.loglikelihoods(self.lm, insts, disable_tqdm=False), dtype=np.float64)
        log.info("LSS unpatched scores: %d requests (%d source x object columns) in %.1f s", len(insts), len(missing),
                 time.time() - start)
        meta = {"fact_ids": self.requests.fact_ids, "provenance": provenance(self.handle.identity, self.data_files),
                "batch_size": self.batch_size,
                "what": "log P(object in object_lang | source prompt), summed over continuation tokens, per fact"}
        return {pair: ({"loglik": torch.from_numpy(column.copy())}, meta)
                for pair, column in zip(missing, ll.reshape(len(missing), self.n))}

    def paired(self, target: str, keep: dict, insts: list, whole_rows: bool) -> np.ndarray:
        """Unpatched log-probs [n, 2] of exactly the requests a patched run toward ``target`` scores (ours,
        then the paper-format ones), in the same order and batches, and in whole rows where the patch forces
        them (cached per model, sample, sources, target and layout)."""
        paper = self.requests.paper
        spec = {**self.spec(next(iter(keep)), target), "source": list(keep), "batch_size": self.batch_size,
                "sample": [self.requests.sample_hash[source] for source in keep], "paired_layout": True,
                "paper_sample": [paper.sample_hash[s] for s in keep if s in paper.sample_hash] if paper else [],
                "whole_rows": whole_rows}

        def compute():
            with lmeval.whole_rows(self.lm, whole_rows):
                ll = lmeval.loglikelihoods(self.lm, insts, disable_tqdm=False)
            return {"loglik": torch.tensor(ll, dtype=torch.float64)}, {"sources": list(keep), "target": target,
                                                                       "whole_rows": whole_rows}

        if self.store is None:
            tensors, hit = compute()[0], False
        else:
            entry = self.store.get_or_compute(UNPATCHED_KIND, spec, compute)
            tensors, hit = entry.tensors, not entry.computed
        for source in keep:
            self.cached[source] = self.cached.get(source, True) and hit
        return np.asarray(tensors["loglik"].numpy(), dtype=np.float64).reshape(-1, 2)


class LssEvaluator:
    """One model load, one HFLM, the requests built once, each target's unpatched run shared by every patch.

    ``score(neurons, spec)`` patches toward ``spec.target`` and returns LSS(s→t) for every source s ≠ t.
    ``exclude_n_facts`` holds out the reporting sample of that size (a factor search's sample); ``skip_n_facts``
    leaves out the first facts of the draw (a compare search's, so its final sample is fresh).
    """

    def __init__(self, handle: ModelHandle, settings: LssSettings, data_root, store: CacheStore | None,
                 sources: tuple[str, ...] | None = None, exclude_n_facts: int | str | None = None,
                 skip_n_facts: int = 0):
        self.handle = handle
        self.settings = settings.at_dtype(handle.model.dtype)
        self.batch_size = self.settings.batch_size or handle.batch_size
        self.sources = tuple(sources or self.settings.sources)
        root = data.mlama_root(data_root)
        mlama = data.read_mlama(root)
        self.mlama_summary, self.data_files = mlama.summary(), list(mlama.files)
        self.lm = engine_of(handle).lm(self.batch_size)
        self.root, self.exclude_n_facts, self.skip_n_facts = root, exclude_n_facts, skip_n_facts
        self.requests = LssRequests.build(self.settings, self.sources, root, exclude_n_facts, skip_n_facts=skip_n_facts)
        self._prefixed: dict[str, LssRequests] = {}  # prompt prefix -> the same sample with prefixed prompts
        self.fact_ids, self.n = self.requests.fact_ids, len(self.requests.fact_ids)
        self.unpatched = UnpatchedScores(handle, self.lm, self.requests, self.settings, self.batch_size, store,
                                         self.data_files)

    def paired_layout(self) -> bool:
        """Always (since LSS_VERSION 4): every dtype scores the unpatched requests in the patched run's layout.
        In bf16 a change of layout moves a long object's summed log-prob by up to ~1.6 nats (Gemma-3-270M,
        scripts/bf16_check.py), in fp32 by up to ~1e-4, which ``lss_paper`` (any shift above 0 wins) would
        count; the shared columns (``UnpatchedScores.ensure``, 15 objects per prompt) no longer feed a score."""
        return True

    def _requests_toward(self, target: str, prefix: str = "") -> tuple[dict[str, list[int]], list, list]:
        """Per source s ≠ target: the facts whose two objects differ, and their [obj_s, obj_t] requests in order,
        then the same in the paper's format for the sources where it differs from ours; plain and with
        ``prefix`` before every prompt (a prompt baseline; the same requests when it is empty)."""
        if prefix and prefix not in self._prefixed:
            self._prefixed[prefix] = LssRequests.build(self.settings, self.sources, self.root, self.exclude_n_facts,
                                                       prefix, self.skip_n_facts)
        t = LSS_LANGS.index(target)
        keep = {source: [i for i, row in enumerate(self.requests.continuations[source])
                         if row[t] != row[LSS_LANGS.index(source)]] for source in self.sources if source != target}
        lists = []
        for requests in (self.requests, self._prefixed.get(prefix, self.requests)):
            out = []
            for grids in (requests.instances, requests.paper.instances if requests.paper else {}):
                for source in (s for s in keep if s in grids):
                    s = LSS_LANGS.index(source)
                    out += [inst for i in keep[source] for inst in (grids[source][i][s], grids[source][i][t])]
            lists.append(out)
        return keep, lists[0], lists[1]

    def shifts(self, neurons: NeuronSet, spec: PatchSpec | Intervention) -> LssShifts:
        """Per source s ≠ t: the shift Δ(patched toward t) − Δ(unpatched) of every sampled fact, ours and in the
        paper's format; the patched requests of all sources go to lm-eval in one batched call."""
        target = spec.target
        if target not in LSS_LANGS:
            raise UserError(f"lang={target} is not an LSS language: LSS covers {' '.join(LSS_LANGS)}")
        keep, insts, scored = self._requests_toward(target, getattr(spec, "prefix", ""))
        intervention = engine_of(self.handle).intervene(neurons, spec)
        whole_rows = bool(intervention.reads_whole_rows)  # the patched run's layout: the unpatched one's too
        unpatched = self.unpatched.paired(target, keep, insts, whole_rows)  # [requests / 2, 2]: obj_s, obj_t
        start = time.time()
        with lmeval.whole_rows(self.lm, whole_rows), intervention as patch:
            ll = np.asarray(lmeval.loglikelihoods(self.lm, scored, disable_tqdm=False), dtype=np.float64)
            patch_summary = patch.summary()
        seconds = time.time() - start
        ll = ll.reshape(-1, 2)
        delta = (ll[:, 1] - ll[:, 0]) - (unpatched[:, 1] - unpatched[:, 0])  # [requests / 2]
        ours, paper = self._spread(delta, keep)
        return LssShifts(ours, paper, patch_summary, seconds, len(insts))

    def _spread(self, delta: np.ndarray, keep: dict[str, list[int]]) -> tuple[dict, dict]:
        """The shifts of ``_requests_toward``'s order as float64 [N] per source (NaN: same-string objects), ours
        and the paper-format ones (ours where the paper's requests are the same)."""
        paper_sources = self.requests.paper.instances if self.requests.paper else {}
        out, offset = ({}, {}), 0
        for shifts, sources in ((out[0], list(keep)), (out[1], [s for s in keep if s in paper_sources])):
            for source in sources:
                shifts[source] = np.full(self.n, np.nan)
                shifts[source][keep[source]] = delta[offset: offset + len(keep[source])]
                offset += len(keep[source])
        assert offset == delta.size, (offset, delta.size)
        return out[0], {source: out[1].get(source, out[0][source]) for source in keep}

    def deltas(self, neurons: NeuronSet, spec: PatchSpec | Intervention):
        """(our shifts per source, patch summary, patched seconds, requests): ``shifts`` without the paper's."""
        found = self.shifts(neurons, spec)
        return found.ours, found.patch, found.seconds, found.requests

    def score(self, neurons: NeuronSet, spec: PatchSpec | Intervention) -> LssResult:
        """LSS(s→t) for every source s ≠ t = spec.target, scored under ``engine_of(handle).intervene(neurons, spec)``.
        """
        found, s = self.shifts(neurons, spec), self.settings
        cells = tuple(metrics.lss_cell(source, spec.target, shift, tol=s.tol, n_boot=s.bootstrap, seed=s.seed,
                                       paper_shift=found.paper[source]) for source, shift in found.ours.items())
        return LssResult(target=spec.target, patch=found.patch, cells=cells, tol=self.settings.tol, n_facts=self.n,
                         fact_ids=list(self.fact_ids), requests=found.requests, wall_time_s=round(found.seconds, 2),
                         unpatched_cached=dict(self.unpatched.cached), data=self.mlama_summary)


def data_files(data_root) -> list:
    """The mLAMA files LSS reads (for provenance)."""
    return list(data.read_mlama(data.mlama_root(data_root)).files)


def lss_for_target(handle: ModelHandle, neurons: NeuronSet, spec: PatchSpec | Intervention,
                   settings: LssSettings, data_root, store: CacheStore | None) -> LssResult:
    """A job with ``lang=t``: LSS(s→t) for every source s ≠ t (``lss.sources``)."""
    return LssEvaluator(handle, settings, data_root, store).score(neurons, spec)


def lss_matrix(handle: ModelHandle, neurons: NeuronSet, spec_for: Callable[[str], PatchSpec | Intervention],
               settings: LssSettings | None, data_root, store: CacheStore | None,
               evaluator: LssEvaluator | None = None) -> LssMatrix:
    """The sources x targets LSS matrix in one model load: one unpatched (cached) and one patched run per target.

    ``spec_for(target)`` gives the patch toward that target.
    """
    evaluator = evaluator or LssEvaluator(handle, settings, data_root, store)
    sources, targets = list(evaluator.sources), list(evaluator.settings.targets)
    cells, per_target, seconds = [], {}, 0.0
    for target in targets:
        result = evaluator.score(neurons, spec_for(target))
        seconds += result.wall_time_s
        per_target[target] = {"mean_lss": result.mean, "mean_lss_paper": result.mean_paper,
                              "patch": result.patch.patch, "neurons": result.patch.neurons}
        cells += result.cells
        log.info("LSS toward %s: mean %.3f (paper's rule %.3f) over %d sources (%.1f s)", target, result.mean,
                 result.mean_paper, len(result.cells), result.wall_time_s)
    return LssMatrix(sources=sources, targets=targets, cells=tuple(cells), tol=evaluator.settings.tol,
                     n_facts=evaluator.n, fact_ids=list(evaluator.fact_ids), per_target=per_target,
                     n_weakest=evaluator.settings.weakest, unpatched_cached=dict(evaluator.unpatched.cached),
                     data=evaluator.mlama_summary, patched_wall_time_s=round(seconds, 2))
