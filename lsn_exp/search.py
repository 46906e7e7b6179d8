"""The factor search (stage=factor_search) and ``factor=best``.

The search scores every entry of ``lss.search.grid`` on the mean off-diagonal LSS of a sample of facts drawn
disjoint from the reporting sample (``lss.n_facts`` with ``lss.seed``), ranks them and saves the winner under
a key made of everything that shaped the search: model, neuron artifact, neuron set, layers, the other
languages' op, the grid, the sample, sources, targets and tolerance. ``factor=best`` recomputes that key from
its own config, so it only ever resolves a search run with the same settings.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from lsn_exp.errors import UserError
from lsn_exp.results import FactorSearchResult
from lsn_exp.resume import best_under
from lsn_exp.settings import lss_settings, search_config
from lsn_exp.specs import PatchSpec, parse_factor, parse_layers, plain

if TYPE_CHECKING:
    from lsn_exp.artifacts import ArtifactStore
    from lsn_exp.models import ModelHandle
    from lsn_exp.neuronset import NeuronArtifact

log = logging.getLogger(__name__)

BEST_FACTOR_KIND = "lss_best_factor"
SEARCH_VERSION = 2  # bump when the search's sampling or ranking changes
ENTRY_KEYS = ("op", "value", "stat", "coef")  # what a grid entry may set besides its factor
SHARED_PATCH_KEYS = ("neuron_set", "layers", "others_op", "others_value", "others_langs")  # cfg.patch, every entry


def grid(lss_cfg) -> list[dict]:
    """``lss.search.grid`` as plain entries, each with a unique ``name``."""
    entries = [dict(e) for e in (plain(lss_cfg).get("search") or {}).get("grid") or []]
    if not entries:
        raise UserError("lss.search.grid is empty: list entries like {name: pmax, factor: pmax} "
                        "(conf/lss/default.yaml)")
    for entry in entries:
        entry["name"] = entry.get("name") or "_".join(
            f"{k}{entry[k]}" for k in ("factor", *ENTRY_KEYS) if entry.get(k) is not None)
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise UserError(f"lss.search.grid has duplicate names: {names}")
    return entries


def entry_patch(entry: dict, patch_cfg) -> tuple[dict, Any]:
    """(patch config, Factor) of a grid entry (or a saved winner) over ``cfg.patch``'s shared keys."""
    merged = {key: plain(patch_cfg).get(key) for key in SHARED_PATCH_KEYS}
    merged.update({"op": None, "value": None, "stat": None, "coef": 1.0})
    merged.update({k: entry[k] for k in ENTRY_KEYS if entry.get(k) is not None})
    return merged, parse_factor(entry.get("factor", 1))


def entry_spec(entry: dict, patch_cfg, target: str) -> PatchSpec:
    return PatchSpec.from_config(*entry_patch(entry, patch_cfg), target)


def grid_specs(lss_cfg, patch_cfg, target: str) -> list[PatchSpec]:
    """Every grid entry's patch toward ``target``: fails on a bad entry before anything is scored."""
    return [entry_spec(entry, patch_cfg, target) for entry in grid(lss_cfg)]


def search_key(model_identity: dict, artifact_key: str | None, patch_cfg, lss_cfg) -> dict:
    """Everything that shaped a search; the saved winner is stored under it and ``factor=best`` looks it up."""
    patch = plain(patch_cfg)
    scored = lss_settings(search_config(lss_cfg))
    report = lss_settings(lss_cfg)
    return {"model": model_identity, "neurons": artifact_key, "search_version": SEARCH_VERSION,
            "neuron_set": patch.get("neuron_set", "lape"), "layers": parse_layers(patch.get("layers")),
            "others_op": patch.get("others_op"), "others_value": patch.get("others_value"),
            "others_langs": patch.get("others_langs"),
            "grid": [{k: v for k, v in sorted(e.items())} for e in grid(lss_cfg)],
            "n_facts": scored.n_facts, "seed": scored.seed, "disjoint_from": report.n_facts,
            "sources": list(scored.sources), "targets": list(scored.targets), "tol": plain(lss_cfg).get("tol", "auto")}


def resolve_best(model_identity: dict, store: ArtifactStore, patch_cfg, lss_cfg, artifact_key: str | None,
                 search_command: str) -> tuple[tuple[dict, Any], dict]:
    """``factor=best``: ((patch config with the winner's op/value/stat/coef, Factor) for PatchSpec.from_config,
    the winner as the job records it)."""
    meta, ran = best_under(store, BEST_FACTOR_KIND, search_key(model_identity, artifact_key, patch_cfg, lss_cfg),
                           "entry", f"factor=best: no factor search matches this model, neuron artifact, patch "
                           f"(neuron_set, layers, others) and lss.search settings; run `{search_command}` first, "
                           f"or name a factor (factor=5, factor=pmax)")
    return entry_patch(meta["entry"], patch_cfg), ran


def factor_search(handle: ModelHandle, artifact: NeuronArtifact, patch_cfg, lss_cfg, data_root,
                  store: ArtifactStore | None, artifact_key: str | None = None) -> tuple[FactorSearchResult, dict]:
    """Score every grid entry on mean off-diagonal LSS, rank them and save the winner for ``factor=best``.

    Returns the ranking and each entry's LssMatrix (name -> matrix) for the job to write."""
    from lsn_exp import lss  # torch and lm-eval: only when a search runs (preflight imports this module)

    entries = grid(lss_cfg)
    for entry in entries:
        entry_spec(entry, patch_cfg, artifact.languages[0])  # fail on a bad entry before any scoring
    reported = lss_settings(lss_cfg).n_facts
    evaluator = lss.LssEvaluator(handle, search_config(lss_cfg), data_root, store, exclude_n_facts=reported)
    rows, matrices = [], {}
    for entry in entries:
        start = time.time()
        matrices[entry["name"]] = lss.lss_matrix(handle, artifact, lambda t, e=entry: entry_spec(e, patch_cfg, t),
                                                 None, data_root, store, evaluator=evaluator)
        rows.append(_ranking_row(entry, matrices[entry["name"]], time.time() - start))
        log.info("factor search: %s -> mean off-diagonal LSS %.3f", entry["name"], rows[-1]["mean_offdiag_lss"])
    sample = (f"{evaluator.n} facts (seed {evaluator.settings.seed}) drawn disjoint from the "
              f"{reported}-fact reporting sample")
    ranked = rank(rows, sample)
    best = {"name": ranked[0]["name"], "entry": ranked[0]["entry"], "mean_offdiag_lss": ranked[0]["mean_offdiag_lss"],
            "sample": sample, "ranking": [{k: r[k] for k in ("rank", "name", "mean_offdiag_lss")} for r in ranked]}
    if store is not None:
        key = search_key(handle.identity, artifact_key, patch_cfg, lss_cfg)
        best["path"] = str(save_winner(store, key, ranked, best))
    result = FactorSearchResult(ranking=ranked, best=best, sample=sample, n_facts=evaluator.n,
                                fact_ids=list(evaluator.fact_ids), unpatched_cached=dict(evaluator.unpatched.cached))
    return result, matrices


def _ranking_row(entry: dict, matrix, seconds: float) -> dict:
    weakest = matrix.weakest(1)
    return {"name": entry["name"], "mean_offdiag_lss": matrix.mean_offdiag,
            "mean_offdiag_lss_paper": matrix.mean_offdiag_paper, "min_cell": weakest[0].lss if weakest else None,
            "patch": next(iter(matrix.per_target.values()))["patch"] if matrix.per_target else "",
            "wall_time_s": round(seconds, 1), "entry": {k: v for k, v in entry.items() if k != "name"}}


def rank(rows: list[dict], sample: str) -> list[dict]:
    """Rows by mean off-diagonal LSS, best first (NaN last; ties by name), numbered from 1."""
    ranked = sorted(rows, key=lambda r: (-_sortable(r["mean_offdiag_lss"]), r["name"]))
    for position, row in enumerate(ranked, 1):
        row.update(rank=position, sample=sample)
    return ranked


def save_winner(store: ArtifactStore, key: dict, ranked: list[dict], best: dict):
    import torch

    scores = torch.tensor([_sortable(r["mean_offdiag_lss"]) for r in ranked], dtype=torch.float64)
    return store.save(BEST_FACTOR_KIND, key, {"mean_offdiag_lss": scores}, best)


def _sortable(value) -> float:
    return float("-inf") if value is None or value != value else float(value)
