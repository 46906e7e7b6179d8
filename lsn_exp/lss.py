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
shift above ``lss.tol`` (auto: 1e-3 nats for fp32, 5e-2 for 16-bit), and every cell reports how many
facts lie within the tolerance.
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
from typing import TYPE_CHECKING, Any, Callable

from lsn_exp.errors import UserError
from lsn_exp.evaluate import plain_config

if TYPE_CHECKING:
    from lsn_exp.artifacts import ArtifactStore
    from lsn_exp.identify import NeuronArtifact
    from lsn_exp.models import ModelHandle
    from lsn_exp.patch import PatchSpec

log = logging.getLogger(__name__)

LSS_LANGS = ("en", "nl", "id", "ms", "vi", "ja", "zh", "fr", "pt", "ru", "et", "it", "ta", "th", "tr")
NO_SPACE_LANGS = ("ja", "zh", "th")  # the object is glued on with no space, whatever the template has
MLAMA_HUB_ID = "inayarhmns/MLAMA-dod-185"  # the paper's set (hub only; the local copy is used offline)
LSS_VERSION = 2  # bump when prompts, scoring or the cached baseline's layout change
BASELINE_KIND = "lss_baseline"
BEST_FACTOR_KIND = "lss_best_factor"


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


def sample_facts(facts: list[Fact], n_facts: int | str | None, seed: int) -> list[Fact]:
    """``n_facts`` facts spread over relations: shuffle each relation with ``seed``, then take one fact per
    relation in turn (relations in a seeded order) until ``n_facts``; ``all``/None keeps every fact.
    The sample keeps file order (relation, lineid)."""
    if n_facts is None or str(n_facts).lower() == "all":
        return list(facts)
    try:
        n = int(n_facts)
    except (TypeError, ValueError):
        raise UserError(f"lss.n_facts={n_facts!r} is not a number or 'all'") from None
    if not 0 < n <= len(facts):
        raise UserError(f"lss.n_facts={n} is out of range: use 1..{len(facts)} or 'all'")
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


def lss_docs(data_root, source: str, n_facts: int | str | None = 185, seed: int = 0) -> list[dict]:
    """The documents of task ``lss_<source>``: one per sampled fact, choices = the object in every language."""
    if source not in LSS_LANGS:
        raise UserError(f"lss source {source} is not an LSS language: use one of {' '.join(LSS_LANGS)}")
    root = resolve_data_root(data_root)
    sample = sample_facts(read_mlama(root).facts, n_facts, seed)
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


# --- settings ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LssSettings:
    n_facts: int | str
    seed: int
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    tol: float
    batch_size: int
    bootstrap: int
    weakest: int


def _langs(raw, name: str) -> tuple[str, ...]:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "all"):
        return LSS_LANGS
    codes = [c.strip() for c in raw.split(",")] if isinstance(raw, str) else [str(c) for c in raw]
    unknown = [c for c in codes if c not in LSS_LANGS]
    if unknown or not codes:
        raise UserError(f"lss.{name}={raw!r}: use all or a list of LSS languages ({' '.join(LSS_LANGS)})")
    return tuple(c for c in LSS_LANGS if c in codes)  # canonical order


def default_tol(dtype) -> float:
    """Batch-layout noise bound for a summed log-prob: fp32 ~1e-6..1e-4 nats, 16-bit ~1e-2."""
    name = str(dtype).replace("torch.", "")
    return {"float64": 1e-6, "float32": 1e-3}.get(name, 5e-2)


def settings(lss_cfg, handle: ModelHandle | None = None) -> LssSettings:
    """``cfg.lss`` (conf/lss/default.yaml) with auto values resolved for ``handle``."""
    get = lss_cfg.get
    tol = get("tol", "auto")
    if tol is None or str(tol).lower() == "auto":
        tol = default_tol(handle.model.dtype if handle is not None else "float32")
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise UserError(f"lss.tol={tol!r} is not a number or auto") from None
    if tol < 0:
        raise UserError(f"lss.tol={tol} is negative: use auto or a small positive number of nats, e.g. 1e-3")
    n_facts = get("n_facts", 185)
    if n_facts is None or str(n_facts).lower() == "all":
        n_facts = "all"
    elif not str(n_facts).isdigit() or int(n_facts) < 1:
        raise UserError(f"lss.n_facts={n_facts!r} is not a positive number or 'all'")
    else:
        n_facts = int(n_facts)
    batch = get("batch_size") or (handle.batch_size if handle is not None else 16)
    return LssSettings(n_facts=n_facts, seed=int(get("seed", 0)), sources=_langs(get("sources", "all"), "sources"),
                       targets=_langs(get("targets", "all"), "targets"), tol=tol, batch_size=int(batch),
                       bootstrap=int(get("bootstrap", 1000)), weakest=int(get("weakest", 5)))


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
        self.settings = settings(lss_cfg, handle)
        self.sources = tuple(sources or self.settings.sources)
        self.root = resolve_data_root(data_root)
        mlama = read_mlama(self.root)
        self.mlama_summary = {"facts_usable": len(mlama.facts), "excluded": mlama.excluded,
                              "excluded_by_lang": mlama.excluded_by_lang}
        self.data_files = list(mlama.files)
        self.lm = evaluate.hflm(handle, self.settings.batch_size)
        manager = evaluate.task_manager(metadata={"data_root": str(self.root), "n_facts": self.settings.n_facts,
                                                  "seed": self.settings.seed})
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
                "batch_size": self.settings.batch_size,
                "what": "log P(object in object_lang | source prompt), summed over continuation tokens, per fact"}
        for (source, lang), column in zip(missing, ll):
            tensors = {"loglik": torch.from_numpy(column.copy())}
            if self.store is not None:  # a job that got there first wins: every job then uses the same numbers
                entry = self.store.get_or_compute(BASELINE_KIND, self.baseline_spec(source, lang),
                                                  lambda t=tensors: (t, meta))
                column = entry.tensors["loglik"].numpy()
            self.baseline[source][:, LSS_LANGS.index(lang)] = column
            self.baseline_cached[source] = False

    # -- one patched run --

    def deltas(self, artifact: NeuronArtifact, spec: PatchSpec) -> tuple[dict, dict, float, int]:
        """Per source s ≠ t: (fact indices scored, Δ unpatched, Δ patched toward t), float64 arrays.

        Facts whose two objects are the same string are left out (a win is impossible there). The patched
        requests of all sources go to lm-eval in one batched call.
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
        self.ensure_baseline([target])
        start = time.time()
        with Patch(self.handle, artifact, spec) as patch:
            ll = np.asarray(evaluate.loglikelihoods(self.lm, insts, disable_tqdm=False), dtype=np.float64).reshape(-1, 2)
            patch_summary = patch.summary()
        seconds = time.time() - start
        out, offset = {}, 0
        for source, idx in keep.items():
            s = LSS_LANGS.index(source)
            patched = ll[offset: offset + len(idx)]  # [n, 2]: log P(obj_s), log P(obj_t)
            offset += len(idx)
            base = self.baseline[source][idx]  # [n, 15]
            out[source] = (np.asarray(idx), base[:, t] - base[:, s], patched[:, 1] - patched[:, 0])
        return out, patch_summary, seconds, len(insts)

    def score(self, artifact: NeuronArtifact, spec: PatchSpec) -> dict:
        """LSS(s→t) for every source s ≠ t = spec.target, scored under ``Patch(handle, artifact, spec)``."""
        import numpy as np

        per_source, patch_summary, seconds, n_requests = self.deltas(artifact, spec)
        cells = [cell_stats(source, spec.target, delta_base, delta_patched, skipped=self.n - len(idx),
                            tol=self.settings.tol, n_boot=self.settings.bootstrap, seed=self.settings.seed)
                 for source, (idx, delta_base, delta_patched) in per_source.items()]
        scored = [c["lss"] for c in cells if c["n"] > 0]
        return {"target": spec.target, "patch": patch_summary, "cells": cells,
                "mean_lss": float(np.mean(scored)) if scored else float("nan"),
                "tol": self.settings.tol, "n_facts": self.n, "requests": n_requests,
                "wall_time_s": round(seconds, 2), "baseline_cached": dict(self.baseline_cached)}


def cell_stats(source: str, target: str, delta_base, delta_patched, skipped: int, tol: float, n_boot: int,
               seed: int) -> dict:
    """One cell: the win rate with a bootstrap 95% CI over facts, the mean shift, ties within tol."""
    import numpy as np

    shift = np.asarray(delta_patched, dtype=np.float64) - np.asarray(delta_base, dtype=np.float64)
    wins = shift > tol
    n = int(shift.size)
    cell = {"source": source, "target": target, "n": n, "skipped": int(skipped), "wins": int(wins.sum()),
            "within_tol": int((np.abs(shift) <= tol).sum())}
    if n == 0:
        return {**cell, "lss": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "mean_shift": float("nan")}
    rng = np.random.default_rng([seed, LSS_LANGS.index(source), LSS_LANGS.index(target)])
    boot = wins[rng.integers(0, n, size=(n_boot, n))].mean(axis=1) if n_boot > 0 else np.array([wins.mean()])
    return {**cell, "lss": float(wins.mean()), "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)), "mean_shift": float(shift.mean())}


def lss_for_target(handle: ModelHandle, artifact: NeuronArtifact, spec: PatchSpec, lss_cfg, data_root,
                   store: ArtifactStore | None, out_dir=None) -> dict:
    """A job with ``lang=t``: LSS(s→t) for every source s ≠ t (``lss.sources``) and their mean, as plain data.

    ``lss`` maps source -> LSS; ``cells`` adds each cell's CI, n, skipped facts, ties and mean shift. With
    ``out_dir``, writes lss_<t>_cells.csv and returns it under ``tables`` (W&B key lss/cells).
    """
    evaluator = LssEvaluator(handle, lss_cfg, data_root, store)
    result = evaluator.score(artifact, spec)
    result["data"] = evaluator.mlama_summary
    result["data_files"] = [str(path) for path in evaluator.data_files]
    result["lss"] = {c["source"]: c["lss"] for c in result["cells"]}
    result["tables"] = {}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        result["tables"]["lss/cells"] = _write_cells(result["cells"], Path(out_dir) / f"lss_{spec.target}_cells.csv")
    return result


CELL_FIELDS = ("source", "target", "lss", "ci_low", "ci_high", "n", "skipped", "wins", "within_tol", "mean_shift")


def read_cells(path: Path) -> list[dict]:
    """The cells ``_write_cells`` wrote, with numbers as numbers."""
    import csv

    with open(path, newline="") as handle:
        return [{**row, **{k: float(row[k]) for k in ("lss", "ci_low", "ci_high", "mean_shift")},
                 **{k: int(row[k]) for k in ("n", "skipped", "wins", "within_tol")}} for row in csv.DictReader(handle)]


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
    lss_cells.csv and lss_matrix.png and returns their paths under ``tables`` and ``images`` (W&B keys).
    """
    import numpy as np

    evaluator = evaluator or LssEvaluator(handle, lss_cfg, data_root, store)
    sources, targets = list(evaluator.sources), list(evaluator.settings.targets)
    evaluator.ensure_baseline(targets)  # every column in one batched call (15 objects share each prompt)
    matrix = np.full((len(sources), len(targets)), np.nan)
    cells, per_target, seconds = [], {}, 0.0
    for j, target in enumerate(targets):
        result = evaluator.score(artifact, spec_for(target))
        seconds += result["wall_time_s"]
        per_target[target] = {"mean_lss": result["mean_lss"], "patch": result["patch"]["patch"],
                              "neurons": result["patch"]["neurons"]}
        for cell in result["cells"]:
            matrix[sources.index(cell["source"]), j] = cell["lss"]
            cells.append(cell)
        log.info("LSS toward %s: mean %.3f over %d sources (%.1f s)", target, result["mean_lss"],
                 len(result["cells"]), result["wall_time_s"])
    scored = [c for c in cells if c["n"] > 0]
    weakest = sorted(scored, key=lambda c: (c["lss"], c["source"], c["target"]))[: evaluator.settings.weakest]
    out = {"sources": sources, "targets": targets,
           "matrix": {s: {t: _num(matrix[i, j]) for j, t in enumerate(targets)} for i, s in enumerate(sources)},
           "mean_offdiag": float(np.mean([c["lss"] for c in scored])) if scored else float("nan"),
           "per_target": per_target, "weakest": [{k: c[k] for k in ("source", "target", "lss", "ci_low", "ci_high",
                                                                     "n")} for c in weakest],
           "cells": cells, "tol": evaluator.settings.tol, "n_facts": evaluator.n, "data": evaluator.mlama_summary,
           "data_files": [str(path) for path in evaluator.data_files],
           "baseline_cached": dict(evaluator.baseline_cached), "patched_wall_time_s": round(seconds, 2),
           "tables": {}, "images": {}}
    if out_dir is not None:
        out["tables"], out["images"] = write_matrix_outputs(out, out_dir, title)
    return out


def _num(value: float):
    return None if value != value else float(value)  # NaN -> None (JSON)


def write_matrix_outputs(result: dict, out_dir, title: str = "", prefix: str = "lss") -> tuple[dict, dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources, targets = result["sources"], result["targets"]
    matrix_csv = write_matrix_csv(out_dir / f"{prefix}_matrix.csv", sources, targets, result["matrix"])
    cells_csv = _write_cells(result["cells"], out_dir / f"{prefix}_cells.csv")
    label = title or "LSS"
    png = matrix_heatmap(result["matrix"], sources, targets,
                         f"{label} (mean off-diag {result['mean_offdiag']:.3f}, n={result['n_facts']})",
                         out_dir / f"{prefix}_matrix.png")
    return ({f"{prefix}/matrix": matrix_csv, f"{prefix}/cells": cells_csv}, {f"{prefix}/heatmap": png})


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


# --- factor search ------------------------------------------------------------------------------------

DEFAULT_GRID = (
    {"name": "pmax", "factor": "pmax"},
    {"name": "pmedian", "factor": "pmedian"},
    {"name": "stat_max_set", "op": "set", "stat": "max", "coef": 1.0},
    {"name": "stat_max_add", "op": "add", "stat": "max", "coef": 1.0},
    {"name": "x2", "factor": 2},
    {"name": "x5", "factor": 5},
    {"name": "x10", "factor": 10},
    {"name": "set0", "op": "set", "value": 0.0},
    {"name": "p10", "op": "set", "stat": "percentile", "coef": 10.0},
)
PATCH_KEYS = ("op", "value", "stat", "coef")


def grid_entry_spec(entry: dict, patch_cfg, target: str) -> PatchSpec:
    """A grid entry ({name, factor?, op?, value?, stat?, coef?}) over ``cfg.patch`` -> the spec toward target."""
    from lsn_exp.patch import PatchSpec, parse_factor

    merged = {key: patch_cfg.get(key) for key in ("neuron_set", "layers", "others_op", "others_value")}
    merged.update({"op": None, "value": None, "stat": None, "coef": 1.0})
    merged.update({k: entry[k] for k in PATCH_KEYS if entry.get(k) is not None})
    return PatchSpec.from_config(merged, parse_factor(entry.get("factor", 1)), target)


def factor_search(handle: ModelHandle, artifact: NeuronArtifact, patch_cfg, lss_cfg, data_root,
                  store: ArtifactStore | None, out_dir=None, artifact_key: str | None = None) -> dict:
    """Score every grid entry on mean off-diagonal LSS (``lss.search``: grid, n_facts, sources, targets),
    rank them, write factor_ranking.csv and a heatmap per entry, and save the best as the artifact that
    ``factor=best`` resolves to (``best_factor``)."""
    import csv

    search = lss_cfg.get("search") or {}
    grid = [dict(e) for e in (search.get("grid") or DEFAULT_GRID)]
    names = [e.get("name") or _entry_label(e) for e in grid]
    if len(set(names)) != len(names):
        raise UserError(f"lss.search.grid has duplicate names: {names}")
    scfg = {**plain_config(lss_cfg), **{k: search.get(k) for k in ("n_facts", "sources", "targets")
                                   if search.get(k) is not None}}
    scfg.pop("search", None)
    for entry, name in zip(grid, names):
        entry["name"] = name
        grid_entry_spec(entry, patch_cfg, artifact.languages[0])  # fail on a bad entry before any scoring
    evaluator = LssEvaluator(handle, scfg, data_root, store)
    out_dir = Path(out_dir) if out_dir is not None else None
    rows, tables, images = [], {}, {}
    for entry in grid:
        start = time.time()
        result = lss_matrix(handle, artifact, lambda t, e=entry: grid_entry_spec(e, patch_cfg, t), scfg, data_root,
                            store, out_dir=None, evaluator=evaluator)
        if out_dir is not None:
            _, image = write_matrix_outputs(result, out_dir / "factor_search", f"LSS {entry['name']}",
                                            prefix=f"lss_{entry['name']}")
            images[f"factor_search/{entry['name']}"] = image[f"lss_{entry['name']}/heatmap"]
        rows.append({"name": entry["name"], "mean_offdiag_lss": result["mean_offdiag"],
                     "min_cell": result["weakest"][0]["lss"] if result["weakest"] else None,
                     "patch": next(iter(result["per_target"].values()))["patch"] if result["per_target"] else "",
                     "wall_time_s": round(time.time() - start, 1),
                     "entry": {k: v for k, v in entry.items() if k != "name"}})
        log.info("factor search: %s -> mean off-diagonal LSS %.3f", entry["name"], result["mean_offdiag"])
    ranked = sorted(rows, key=lambda r: (-_sortable(r["mean_offdiag_lss"]), r["name"]))
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    best = {"name": ranked[0]["name"], "entry": ranked[0]["entry"], "mean_offdiag_lss": ranked[0]["mean_offdiag_lss"],
            "model": handle.identity, "artifact": artifact_key, "n_facts": evaluator.n,
            "sources": list(evaluator.sources), "targets": list(evaluator.settings.targets),
            "tol": evaluator.settings.tol, "ranking": [{k: r[k] for k in ("rank", "name", "mean_offdiag_lss")}
                                                       for r in ranked]}
    if store is not None:
        import torch

        path = store.save(BEST_FACTOR_KIND, best_factor_key(handle.identity, artifact_key),
                          {"mean_offdiag_lss": torch.tensor([_sortable(r["mean_offdiag_lss"]) for r in ranked],
                                                            dtype=torch.float64)}, best)
        best["path"] = str(path)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        ranking_csv = out_dir / "factor_ranking.csv"
        with open(ranking_csv, "w", newline="") as handle_:
            writer = csv.DictWriter(handle_, fieldnames=["rank", "name", "mean_offdiag_lss", "min_cell", "patch",
                                                         "wall_time_s"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(ranked)
        tables["factor_search/ranking"] = ranking_csv
    return {"ranking": ranked, "best": best, "tables": tables, "images": images, "n_facts": evaluator.n,
            "baseline_cached": dict(evaluator.baseline_cached),
            "data_files": [str(path) for path in evaluator.data_files]}


def best_factor_key(model_identity: dict, artifact_key: str | None) -> dict:
    """A search's winner belongs to a model and the neuron artifact it patched."""
    return {"model": model_identity, "neurons": artifact_key}


def best_factor(model_identity: dict, store: ArtifactStore, artifact_key: str | None = None) -> dict | None:
    """The factor search's winner for this model and neuron artifact (``factor=best``), or None if no search
    has run on them.

    Returns ``{"name", "entry": {factor?, op?, value?, stat?, coef?}, "mean_offdiag_lss", "ranking", ...}``.
    """
    entry = store.load(BEST_FACTOR_KIND, best_factor_key(model_identity, artifact_key))
    return None if entry is None else entry.meta


def resolve_best(model_identity: dict, store: ArtifactStore, patch_cfg,
                 artifact_key: str | None = None) -> tuple[dict, Any]:
    """``factor=best``: (patch config with the winner's op/value/stat/coef, Factor) for PatchSpec.from_config."""
    from lsn_exp.patch import parse_factor

    best = best_factor(model_identity, store, artifact_key)
    if best is None:
        raise UserError("factor=best needs a factor search for this model and neuron artifact first: run "
                        "stage=factor_search with the same model and identify settings, or name a factor "
                        "(factor=5, factor=pmax)")
    merged = {key: patch_cfg.get(key) for key in ("neuron_set", "layers", "others_op", "others_value")}
    merged.update({"op": None, "value": None, "stat": None, "coef": 1.0})
    merged.update({k: best["entry"][k] for k in PATCH_KEYS if best["entry"].get(k) is not None})
    return merged, parse_factor(best["entry"].get("factor", 1))


def _entry_label(entry: dict) -> str:
    return "_".join(f"{k}{entry[k]}" for k in ("factor", *PATCH_KEYS) if entry.get(k) is not None)


def _sortable(value) -> float:
    return float("-inf") if value is None or value != value else float(value)
