"""LSS (Language Steering Shift): does amplifying target-language neurons move mLAMA answers toward t?

For a fact i, a source language s and a target t (prompt in s, objects in s and t):
    Δ_i = log P(obj_t | prompt_s) − log P(obj_s | prompt_s)        summed continuation log-probs
    LSS(s→t) = (1/N) Σ_i 1[Δ_i(patched toward t) − Δ_i(unpatched) > tol]
A strict win rate: a no-op scores exactly 0, a random perturbation about 0.5 (when tol is tiny).

Data: mLAMA facts present in all 15 languages (``mlama/`` in the data root), one lm-eval task
``lss_<source>`` per source language (lsn_exp/tasks/lss/). Each document is one fact: the source prompt
and, as choices, its object in all 15 languages, so one task run gives the unpatched log-probs for
every target at once. The unpatched log-probs depend only on the model and the sample: cached once
per (model, sample, source, object language) in the ArtifactStore and reused for every target and factor;
a job toward one target scores only the two columns it needs.

Scoring goes through ``evaluate.LsnHFLM``: each prompt runs once and its continuations (2 objects under a
patch, 15 for the baseline) are read from its KV cache.

Batch layout: requests are deduplicated and grouped by prompt, so the cached baseline and a patched
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
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lsn_exp.errors import UserError
from lsn_exp.settings import LSS_LANGS, default_tol, lss_settings, plain  # noqa: F401 (default_tol re-exported)

if TYPE_CHECKING:
    from lsn_exp.artifacts import ArtifactStore
    from lsn_exp.identify import NeuronArtifact
    from lsn_exp.models import ModelHandle
    from lsn_exp.patch import PatchSpec

log = logging.getLogger(__name__)

NO_SPACE_LANGS = ("ja", "zh", "th")  # the object is glued on with no space, whatever the template has
MLAMA_HUB_ID = "inayarhmns/MLAMA-dod-185"  # the paper's set (hub only; the local copy is used offline)
LSS_VERSION = 3  # bump when prompts, scoring or the cached baseline's layout change
BASELINE_KIND = "lss_baseline"


# --- mLAMA: facts, prompts, sample ------------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    """One mLAMA fact in every LSS language."""

    fact_id: str  # "<predicate_id>:<lineid>", e.g. "P17:35"
    relation: str
    prompts: dict[str, str]  # lang -> source template, [X] filled, cut just before [Y], no trailing space
    seps: dict[str, str]  # lang -> what goes between that prompt and an object: " " or ""
    objects: dict[str, str]  # lang -> object label

    def continuation(self, source: str, lang: str) -> str:
        """The object in ``lang`` as a continuation of the ``source`` prompt."""
        return self.seps[source] + self.objects[lang]


@dataclass(frozen=True)
class MlamaFacts:
    facts: list[Fact]  # usable in every language, in file order (relation, lineid)
    excluded: dict[str, int]  # reason -> number of facts (a fact counts once, under its first reason)
    excluded_by_lang: dict[str, dict[str, int]]  # lang -> reason -> facts
    files: list[Path]


def build_prompt(template: str, subject: str, no_space: bool) -> tuple[str, str] | str:
    """(prompt, sep) for a template with one [X] and one [Y], or the reason it cannot give one.

    The prompt is the template up to [Y] with [X] filled; trailing whitespace moves out of the prompt and
    becomes the separator " " (lm-eval scores word-boundary spaces as part of the continuation). Languages
    written without spaces get sep "" and keep no space before the object.
    """
    subject = subject.strip()
    if template.count("[X]") != 1 or template.count("[Y]") != 1:
        return "template_placeholders"
    if not subject:
        return "empty_subject"
    if template.index("[Y]") < template.index("[X]"):
        return "object_before_subject"  # a prompt cut at [Y] would not name the subject
    head = template[: template.index("[Y]")].replace("[X]", subject)
    prompt = head.rstrip()
    if not prompt:
        return "empty_prompt"
    sep = "" if no_space or prompt == head else " "
    return prompt, sep


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"{path} is missing: the data root must hold mlama/templates and mlama/parallel15 "
                        f"(set data.root=DIR or LSN_DATA=DIR)")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@lru_cache(maxsize=4)
def read_mlama(root: Path, langs: tuple[str, ...] = LSS_LANGS,
               no_space_langs: tuple[str, ...] = NO_SPACE_LANGS) -> MlamaFacts:
    """Join ``mlama/parallel15/{lang}.jsonl`` on (predicate_id, lineid); build every language's prompt."""
    root = Path(root) / "mlama"
    files, templates, rows = [], {}, {}
    for lang in langs:
        files += [root / "templates" / f"{lang}.jsonl", root / "parallel15" / f"{lang}.jsonl"]
        templates[lang] = {r["relation"]: r["template"] for r in _read_jsonl(files[-2])}
        rows[lang] = {(r["predicate_id"], int(r["lineid"])): r for r in _read_jsonl(files[-1])}
    keys = list(rows[langs[0]])  # file order of the first language: relation, then lineid
    excluded: Counter = Counter()
    by_lang: dict[str, Counter] = defaultdict(Counter)
    facts = []
    for key in keys:
        relation, lineid = key
        prompts, seps, objects, reasons = {}, {}, {}, {}
        for lang in langs:
            row = rows[lang].get(key)
            if row is None:
                reasons[lang] = "not_in_all_languages"
            elif row["sub_uri"] != rows[langs[0]][key]["sub_uri"] or row["obj_uri"] != rows[langs[0]][key]["obj_uri"]:
                reasons[lang] = "misaligned_uris"
            elif relation not in templates[lang]:
                reasons[lang] = "missing_template"
            elif not row["obj_label"].strip():
                reasons[lang] = "empty_object"
            else:
                built = build_prompt(templates[lang][relation], row["sub_label"], lang in no_space_langs)
                if isinstance(built, str):
                    reasons[lang] = built
                else:
                    prompts[lang], seps[lang] = built
                    objects[lang] = row["obj_label"].strip()
        if reasons:
            for lang, reason in reasons.items():
                by_lang[lang][reason] += 1
            excluded[next(iter(reasons.values()))] += 1
            continue
        facts.append(Fact(f"{relation}:{lineid}", relation, prompts, seps, objects))
    # facts present in some language but not in the first one
    for lang in langs[1:]:
        extra = len(set(rows[lang]) - set(keys))
        if extra:
            by_lang[lang]["not_in_all_languages"] += extra
            excluded["not_in_all_languages"] += extra
    return MlamaFacts(facts, dict(excluded), {k: dict(v) for k, v in by_lang.items()}, files)


def sample_facts(facts: list[Fact], n_facts: int | str | None, seed: int,
                 exclude_n_facts: int | str | None = None) -> list[Fact]:
    """``n_facts`` facts spread over relations: shuffle each relation with ``seed``, then take one fact per
    relation in turn (relations in a seeded order) until ``n_facts``; ``all``/None keeps every fact.

    ``exclude_n_facts``: first remove the sample this function gives for that size and seed (the reporting
    sample), so a factor search never scores a fact it is later reported on. The sample keeps file order.
    """
    if exclude_n_facts is not None:
        held = {f.fact_id for f in sample_facts(facts, exclude_n_facts, seed)}
        facts = [f for f in facts if f.fact_id not in held]
        if not facts:
            raise UserError(f"no facts are left for the search once the {exclude_n_facts}-fact reporting sample is "
                            f"held out: lower lss.n_facts or lss.search.n_facts")
    if n_facts is None or str(n_facts).lower() == "all":
        return list(facts)
    try:
        n = int(n_facts)
    except (TypeError, ValueError):
        raise UserError(f"lss.n_facts={n_facts!r} is not a number or 'all'") from None
    if not 0 < n <= len(facts):
        raise UserError(f"lss.n_facts={n} is out of range: use 1..{len(facts)} or 'all'"
                        + (f" ({len(facts)} facts are left beside the reporting sample)" if exclude_n_facts else ""))
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, fact in enumerate(facts):
        groups[fact.relation].append(i)
    relations = sorted(groups)
    rng.shuffle(relations)
    for relation in relations:
        rng.shuffle(groups[relation])
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for relation in relations:
            if depth < len(groups[relation]) and len(picked) < n:
                picked.append(groups[relation][depth])
        depth += 1
    return [facts[i] for i in sorted(picked)]


def lss_docs(data_root, source: str, n_facts: int | str | None = 185, seed: int = 0,
             exclude_n_facts: int | str | None = None) -> list[dict]:
    """The documents of task ``lss_<source>``: one per sampled fact, choices = the object in every language."""
    if source not in LSS_LANGS:
        raise UserError(f"lss source {source} is not an LSS language: use one of {' '.join(LSS_LANGS)}")
    root = resolve_data_root(data_root)
    sample = sample_facts(read_mlama(root).facts, n_facts, seed, exclude_n_facts)
    return [{"fact_id": f.fact_id, "relation": f.relation, "source": source, "prompt": f.prompts[source],
             "choices": [f.continuation(source, lang) for lang in LSS_LANGS], "langs": list(LSS_LANGS),
             "source_index": LSS_LANGS.index(source)} for f in sample]


def resolve_data_root(setting) -> Path:
    from lsn_exp import data

    root = data.resolve_root(str(setting) if setting else os.environ.get(data.DATA_ENV))
    if root is None:
        data.require_hub("mLAMA")
        raise UserError(f"LSS reads mLAMA from a local data root (mlama/); the hub set {MLAMA_HUB_ID} is not "
                        f"wired: set data.root=DIR or {data.DATA_ENV}=DIR")
    return root


# --- scoring ----------------------------------------------------------------------------------------

class LssEvaluator:
    """One model load, one HFLM, the lss_<source> requests built once, each baseline column scored (or loaded)
    once, when a target first needs it (``ensure_baseline``).

    ``score(artifact, spec)`` patches toward ``spec.target`` and returns LSS(s→t) for every source s ≠ t.
    """

    def __init__(self, handle: ModelHandle, lss_cfg, data_root, store: ArtifactStore | None,
                 sources: tuple[str, ...] | None = None):
        import numpy as np

        from lsn_exp import evaluate

        self.handle, self.store = handle, store
        self.settings = lss_settings(lss_cfg, handle.model.dtype)
        self.batch_size = self.settings.batch_size or handle.batch_size
        self.exclude_n_facts = plain(lss_cfg).get("exclude_n_facts")  # a search sample: the reporting one held out
        self.sources = tuple(sources or self.settings.sources)
        self.root = resolve_data_root(data_root)
        mlama = read_mlama(self.root)
        self.mlama_summary = {"facts_usable": len(mlama.facts), "excluded": mlama.excluded,
                              "excluded_by_lang": mlama.excluded_by_lang}
        self.data_files = list(mlama.files)
        self.lm = evaluate.hflm(handle, self.batch_size)
        manager = evaluate.task_manager(metadata={"data_root": str(self.root), "n_facts": self.settings.n_facts,
                                                  "seed": self.settings.seed, "exclude_n_facts": self.exclude_n_facts})
        tasks = manager.load([f"lss_{s}" for s in self.sources])["tasks"]
        n_langs = len(LSS_LANGS)
        self.instances: dict[str, list[list]] = {}  # source -> [fact][lang] -> Instance
        self.continuations: dict[str, list[list[str]]] = {}
        self.fact_ids: list[str] | None = None
        self.sample_hash: dict[str, str] = {}
        for source in self.sources:
            docs = list(tasks[f"lss_{source}"].eval_docs)
            grid = [[None] * n_langs for _ in docs]
            for inst in evaluate.build_instances(tasks[f"lss_{source}"]):
                doc = docs[inst.doc_id]
                assert inst.args == (doc["prompt"], doc["choices"][inst.idx]), (inst.args, doc)
                grid[inst.doc_id][inst.idx] = inst
            ids = [d["fact_id"] for d in docs]
            if self.fact_ids is None:
                self.fact_ids = ids
            assert ids == self.fact_ids, "every lss_<source> task must hold the same facts in the same order"
            self.instances[source] = grid
            self.continuations[source] = [list(d["choices"]) for d in docs]
            blob = json.dumps([[d["fact_id"], d["prompt"], d["choices"]] for d in docs], ensure_ascii=False)
            self.sample_hash[source] = hashlib.sha256(blob.encode()).hexdigest()
        self.n = len(self.fact_ids or [])
        self.baseline_cached: dict[str, bool] = {}  # source -> every column in use came from the cache
        self.baseline: dict[str, np.ndarray] = {s: np.full((self.n, n_langs), np.nan) for s in self.sources}

    # -- the unpatched log-probs: once per (model, sample, source, object language), in the artifact cache --

    def baseline_spec(self, source: str, lang: str) -> dict:
        from importlib.metadata import version

        return {"model": self.handle.identity, "dtype": str(self.handle.model.dtype),
                "device": getattr(self.handle.device, "type", str(self.handle.device)), "source": source,
                "object_lang": lang, "n_facts": self.settings.n_facts, "seed": self.settings.seed,
                "sample": self.sample_hash[source], "lss_version": LSS_VERSION, "lm_eval": version("lm_eval")}

    def ensure_baseline(self, targets) -> None:
        """Fill ``baseline[s][:, l]`` = unpatched log P(obj_l | prompt_s) for every source s and l in {s} ∪ targets.

        Each (source, object language) column is loaded from the cache or scored once, so a job toward one
        target scores 2 objects per prompt and a matrix scores all 15 in one batched call.
        """
        import numpy as np
        import torch

        from lsn_exp import evaluate
        from lsn_exp.tracking import provenance

        wanted = [(s, lang) for s in self.sources for lang in LSS_LANGS
                  if (lang == s or lang in targets) and np.isnan(self.baseline[s][:, LSS_LANGS.index(lang)]).all()]
        missing = []
        for source, lang in wanted:
            entry = self.store.load(BASELINE_KIND, self.baseline_spec(source, lang)) if self.store else None
            if entry is None:
                missing.append((source, lang))
            else:
                self.baseline[source][:, LSS_LANGS.index(lang)] = entry.tensors["loglik"].numpy()
                self.baseline_cached.setdefault(source, True)
        if not missing:
            return
        insts = [self.instances[s][i][LSS_LANGS.index(lang)] for s, lang in missing for i in range(self.n)]
        start = time.time()
        ll = np.asarray(evaluate.loglikelihoods(self.lm, insts, disable_tqdm=False), dtype=np.float64).reshape(len(missing), self.n)
        log.info("LSS baseline: %d requests (%d source x object columns) in %.1f s", len(insts), len(missing),
                 time.time() - start)
        meta = {"fact_ids": self.fact_ids, "provenance": provenance(self.handle.identity, self.data_files),
                "batch_size": self.batch_size,
                "what": "log P(object in object_lang | source prompt), summed over continuation tokens, per fact"}
        for (source, lang), column in zip(missing, ll):
            tensors = {"loglik": torch.from_numpy(column.copy())}
            if self.store is not None:  # a job that got there first wins: every job then uses the same numbers
                entry = self.store.get_or_compute(BASELINE_KIND, self.baseline_spec(source, lang),
                                                  lambda t=tensors: (t, meta))
                column = entry.tensors["loglik"].numpy()
            self.baseline[source][:, LSS_LANGS.index(lang)] = column
            self.baseline_cached[source] = False

    # -- 16-bit models: the unpatched scores in the patched run's exact batch layout --

    def paired_layout(self) -> bool:
        """In bf16/fp16 a change of batch layout moves a long object's summed log-prob by up to ~1.6 nats
        (Gemma-3-270M, scripts/bf16_check.py), far above any usable tolerance; the shared baseline columns
        (15 or 3 objects per prompt) are then replaced by an unpatched run of the patched run's own requests."""
        return str(self.handle.model.dtype).replace("torch.", "") not in ("float32", "float64")

    def paired_baseline(self, target: str, keep: dict, insts: list):
        """Unpatched log-probs [n, 2] of exactly the requests a patched run toward ``target`` scores, in the same
        order and batches (cached per model, sample, sources and target)."""
        import numpy as np
        import torch

        from lsn_exp import evaluate

        first = next(iter(keep))
        spec = {**self.baseline_spec(first, target), "source": list(keep), "batch_size": self.batch_size,
                "sample": [self.sample_hash[source] for source in keep], "paired_layout": True}

        def compute():
            ll = evaluate.loglikelihoods(self.lm, insts, disable_tqdm=False)
            return {"loglik": torch.tensor(ll, dtype=torch.float64)}, {"sources": list(keep), "target": target}

        if self.store is None:
            tensors, _ = compute()
        else:
            tensors = self.store.get_or_compute(BASELINE_KIND, spec, compute).tensors
        return np.asarray(tensors["loglik"].numpy(), dtype=np.float64).reshape(-1, 2)

    # -- one patched run --

    def deltas(self, artifact: NeuronArtifact, spec: PatchSpec) -> tuple[dict, dict, float, int]:
        """Per source s ≠ t: the shift Δ(patched toward t) − Δ(unpatched) of every sampled fact, float64 [N];
        NaN where the two objects are the same string (a win is impossible there, so it is not scored).

        The patched requests of all sources go to lm-eval in one batched call.
        """
        import numpy as np

        from lsn_exp import evaluate
        from lsn_exp.patch import Patch

        target = spec.target
        if target not in LSS_LANGS:
            raise UserError(f"lang={target} is not an LSS language: LSS covers {' '.join(LSS_LANGS)}")
        t = LSS_LANGS.index(target)
        keep, insts = {}, []
        for source in (s for s in self.sources if s != target):
            s = LSS_LANGS.index(source)
            keep[source] = [i for i, row in enumerate(self.continuations[source]) if row[t] != row[s]]
            for i in keep[source]:
                insts += [self.instances[source][i][s], self.instances[source][i][t]]
        paired = self.paired_layout()
        if paired:
            unpatched = self.paired_baseline(target, keep, insts)
        else:
            self.ensure_baseline([target])
        start = time.time()
        with Patch(self.handle, artifact, spec) as patch:
            ll = np.asarray(evaluate.loglikelihoods(self.lm, insts, disable_tqdm=False), dtype=np.float64).reshape(-1, 2)
            patch_summary = patch.summary()
        seconds = time.time() - start
        shifts, offset = {}, 0
        for source, idx in keep.items():
            s = LSS_LANGS.index(source)
            patched = ll[offset: offset + len(idx)]  # [n, 2]: log P(obj_s), log P(obj_t)
            if paired:
                base_delta = unpatched[offset: offset + len(idx), 1] - unpatched[offset: offset + len(idx), 0]
            else:
                base = self.baseline[source][idx]  # [n, 15]
                base_delta = base[:, t] - base[:, s]
            offset += len(idx)
            shift = np.full(self.n, np.nan)
            shift[idx] = (patched[:, 1] - patched[:, 0]) - base_delta
            shifts[source] = shift
        return shifts, patch_summary, seconds, len(insts)

    def score(self, artifact: NeuronArtifact, spec: PatchSpec) -> dict:
        """LSS(s→t) for every source s ≠ t = spec.target, scored under ``Patch(handle, artifact, spec)``."""
        shifts, patch_summary, seconds, n_requests = self.deltas(artifact, spec)
        cells = [cell_stats(source, spec.target, shift, tol=self.settings.tol, n_boot=self.settings.bootstrap,
                            seed=self.settings.seed) for source, shift in shifts.items()]
        return {"target": spec.target, "patch": patch_summary, "cells": cells, "mean_lss": mean_of(cells, "lss"),
                "mean_lss_paper": mean_of(cells, "lss_paper"), "tol": self.settings.tol, "n_facts": self.n,
                "fact_ids": list(self.fact_ids or []), "requests": n_requests, "wall_time_s": round(seconds, 2),
                "baseline_cached": dict(self.baseline_cached)}


OUTCOME = {True: "1", False: "0", None: "s"}  # per fact in a cell: win, no win, skipped (same-string objects)


def cell_stats(source: str, target: str, shift, tol: float, n_boot: int, seed: int) -> dict:
    """One cell from the per-fact shifts (NaN: skipped, the two objects are the same string).

    ``lss``: wins / scored facts (skipped facts leave the denominator); ``lss_paper``: wins / all facts (the
    paper's count: a same-string fact is a non-win). Each with a bootstrap 95% CI over facts; the mean shift,
    ties within tol, and ``outcomes``, one character per fact (1 win, 0 no win, s skipped), for reports that
    resample facts across cells.
    """
    import numpy as np

    shift = np.asarray(shift, dtype=np.float64)
    scored = ~np.isnan(shift)
    wins = np.where(scored, shift > tol, False)
    n, total = int(scored.sum()), int(shift.size)
    cell = {"source": source, "target": target, "n": n, "skipped": total - n, "wins": int(wins.sum()),
            "within_tol": int((np.abs(shift[scored]) <= tol).sum()),
            "outcomes": "".join(OUTCOME[bool(w) if s else None] for w, s in zip(wins, scored))}
    rng = np.random.default_rng([seed, LSS_LANGS.index(source), LSS_LANGS.index(target)])
    for name, values in (("lss", wins[scored]), ("lss_paper", wins)):
        lo, hi = _bootstrap_ci(values.astype(np.float64), n_boot, rng)
        cell.update({name: float(values.mean()) if values.size else float("nan"),
                     f"{name}_ci_low" if name != "lss" else "ci_low": lo,
                     f"{name}_ci_high" if name != "lss" else "ci_high": hi})
    cell["mean_shift"] = float(shift[scored].mean()) if n else float("nan")
    return cell


def _bootstrap_ci(values, n_boot: int, rng) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` over ``n_boot`` resamples (NaN when empty)."""
    import numpy as np

    if values.size == 0:
        return float("nan"), float("nan")
    boot = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1) if n_boot > 0 \
        else np.array([values.mean()])
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def mean_of(cells: list[dict], key: str) -> float:
    """Mean of ``key`` over the cells that scored at least one fact (NaN when none did)."""
    values = [c[key] for c in cells if c["n"] > 0]
    return sum(values) / len(values) if values else float("nan")


def lss_for_target(handle: ModelHandle, artifact: NeuronArtifact, spec: PatchSpec, lss_cfg, data_root,
                   store: ArtifactStore | None, out_dir=None) -> dict:
    """A job with ``lang=t``: LSS(s→t) for every source s ≠ t (``lss.sources``) and their mean, as plain data.

    ``lss`` / ``lss_paper`` map source -> LSS; ``cells`` adds each cell's CIs, n, skipped facts, ties, mean
    shift and per-fact outcomes. With ``out_dir``, writes lss_<t>_cells.csv under ``tables`` (W&B key lss/cells).
    """
    evaluator = LssEvaluator(handle, lss_cfg, data_root, store)
    result = evaluator.score(artifact, spec)
    result["data"] = evaluator.mlama_summary
    result["data_files"] = [str(path) for path in evaluator.data_files]
    result["lss"] = {c["source"]: c["lss"] for c in result["cells"]}
    result["lss_paper"] = {c["source"]: c["lss_paper"] for c in result["cells"]}
    result["tables"] = {}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        result["tables"]["lss/cells"] = _write_cells(result["cells"], Path(out_dir) / f"lss_{spec.target}_cells.csv")
    return result


FLOAT_FIELDS = ("lss", "ci_low", "ci_high", "lss_paper", "lss_paper_ci_low", "lss_paper_ci_high", "mean_shift")
INT_FIELDS = ("n", "skipped", "wins", "within_tol")
CELL_FIELDS = ("source", "target", "lss", "ci_low", "ci_high", "lss_paper", "lss_paper_ci_low", "lss_paper_ci_high",
               "n", "skipped", "wins", "within_tol", "mean_shift", "outcomes")


def read_cells(path: Path) -> list[dict]:
    """The cells ``_write_cells`` wrote, with numbers as numbers."""
    import csv

    with open(path, newline="") as handle:
        return [{**row, **{k: float(row[k]) for k in FLOAT_FIELDS}, **{k: int(row[k]) for k in INT_FIELDS}}
                for row in csv.DictReader(handle)]


def _write_cells(cells: list[dict], path: Path) -> Path:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CELL_FIELDS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(cells)
    return path


def lss_matrix(handle: ModelHandle, artifact: NeuronArtifact, spec_for: Callable[[str], PatchSpec], lss_cfg,
               data_root, store: ArtifactStore | None, out_dir=None, title: str = "",
               evaluator: LssEvaluator | None = None) -> dict:
    """The sources x targets LSS matrix in one model load: the baseline once, one patched run per target.

    ``spec_for(target)`` gives the patch toward that target. With ``out_dir``, writes lss_matrix.csv,
    lss_matrix_paper.csv, lss_cells.csv and their heatmaps, returned under ``tables`` and ``images`` (W&B keys).
    """
    evaluator = evaluator or LssEvaluator(handle, lss_cfg, data_root, store)
    sources, targets = list(evaluator.sources), list(evaluator.settings.targets)
    if not evaluator.paired_layout():  # 16-bit: each target's unpatched run is paired with its patched run
        evaluator.ensure_baseline(targets)  # every column in one batched call (15 objects share each prompt)
    cells, per_target, seconds = [], {}, 0.0
    for target in targets:
        result = evaluator.score(artifact, spec_for(target))
        seconds += result["wall_time_s"]
        per_target[target] = {"mean_lss": result["mean_lss"], "mean_lss_paper": result["mean_lss_paper"],
                              "patch": result["patch"]["patch"], "neurons": result["patch"]["neurons"]}
        cells += result["cells"]
        log.info("LSS toward %s: mean %.3f (paper count %.3f) over %d sources (%.1f s)", target, result["mean_lss"],
                 result["mean_lss_paper"], len(result["cells"]), result["wall_time_s"])
    weakest = sorted((c for c in cells if c["n"] > 0), key=lambda c: (c["lss"], c["source"], c["target"]))
    out = {"sources": sources, "targets": targets, "matrix": cell_matrix(cells, sources, targets, "lss"),
           "matrix_paper": cell_matrix(cells, sources, targets, "lss_paper"),
           "mean_offdiag": mean_of(cells, "lss"), "mean_offdiag_paper": mean_of(cells, "lss_paper"),
           "per_target": per_target,
           "weakest": [{k: c[k] for k in ("source", "target", "lss", "ci_low", "ci_high", "n", "lss_paper")}
                       for c in weakest[: evaluator.settings.weakest]],
           "cells": cells, "tol": evaluator.settings.tol, "n_facts": evaluator.n,
           "fact_ids": list(evaluator.fact_ids or []), "data": evaluator.mlama_summary,
           "data_files": [str(path) for path in evaluator.data_files],
           "baseline_cached": dict(evaluator.baseline_cached), "patched_wall_time_s": round(seconds, 2),
           "tables": {}, "images": {}}
    if out_dir is not None:
        out["tables"], out["images"] = write_matrix_outputs(out, out_dir, title)
    return out


def cell_matrix(cells: list[dict], sources: list[str], targets: list[str], key: str) -> dict:
    """``matrix[source][target]`` = the cell's ``key`` (None where not scored)."""
    values = {(c["source"], c["target"]): c[key] for c in cells if c["n"] > 0}
    return {s: {t: values.get((s, t)) for t in targets} for s in sources}


def write_matrix_outputs(result: dict, out_dir, title: str = "", prefix: str = "lss") -> tuple[dict, dict]:
    """The LSS and paper-count matrices (CSV + heatmap) and the cells CSV of a matrix result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources, targets = result["sources"], result["targets"]
    tables = {f"{prefix}/cells": _write_cells(result["cells"], out_dir / f"{prefix}_cells.csv")}
    images = {}
    for suffix, matrix, mean, what in (("", result["matrix"], result["mean_offdiag"], "same-string facts skipped"),
                                       ("_paper", result["matrix_paper"], result["mean_offdiag_paper"],
                                        "paper count: same-string facts are non-wins")):
        stem = f"{prefix}_matrix{suffix}"
        tables[f"{prefix}/matrix{suffix}"] = write_matrix_csv(out_dir / f"{stem}.csv", sources, targets, matrix)
        images[f"{prefix}/heatmap{suffix}"] = matrix_heatmap(
            matrix, sources, targets, f"{title or 'LSS'} ({what}; mean off-diag {mean:.3f}, n={result['n_facts']})",
            out_dir / f"{stem}.png")
    return tables, images


def write_matrix_csv(path: Path, sources: list[str], targets: list[str], matrix: dict) -> Path:
    """``matrix[source][target]`` (None: not scored) as a source x target CSV."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source\\target", *targets])
        for s in sources:
            writer.writerow([s, *["" if matrix[s].get(t) is None else f"{matrix[s][t]:.4f}" for t in targets]])
    return path


def matrix_heatmap(matrix: dict, sources: list[str], targets: list[str], title: str, path: Path) -> Path:
    """``matrix[source][target]`` (None: not scored) as a heatmap centred on 0.5, a random patch's LSS."""
    from lsn_exp import plots

    values = [[float("nan") if matrix[s].get(t) is None else matrix[s][t] for t in targets] for s in sources]
    return plots.heatmap(values, sources, targets, title, path, fmt=".2f", cmap="coolwarm", center=0.5,
                         xlabel="target (patched toward)", ylabel="source (prompt language)")
