"""The factor search (stage=factor_search) and ``factor=best``.

The search scores every entry of ``lss.search.grid`` on the mean off-diagonal LSS of a sample of facts drawn
disjoint from the reporting sample (``lss.n_facts`` with ``lss.seed``), ranks them and saves the winner under
a key made of everything that shaped the search: model, neuron set (its key), `patch.neuron_set`, layers, the other
languages' op, the grid, the sample, sources, targets and tolerance. ``factor=best`` recomputes that key from
its own config, so it only ever resolves a search run with the same settings.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from lsn_exp.results import FactorSearchResult
from lsn_exp.resume import best_under
from lsn_exp.settings import GRID_ENTRY_KEYS, FactorSearchSettings
from lsn_exp.specs import Factor, PatchSpec, parse_factor, parse_layers

if TYPE_CHECKING:
    from lsn_exp.cache import CacheStore
    from lsn_exp.models import ModelHandle
    from lsn_exp.neuronset import NeuronSet

log = logging.getLogger(__name__)

BEST_FACTOR_KIND = "lss_best_factor"
SEARCH_VERSION = 2  # bump when the search's sampling or ranking changes
SHARED_PATCH_KEYS = ("neuron_set", "layers", "others_op", "others_value", "others_langs")  # cfg.patch, every entry


def entry_patch(entry: dict, patch_cfg: dict) -> tuple[dict, Factor]:
    """(patch config, Factor) of a grid entry (or a saved winner) over ``cfg.patch``'s shared keys."""
    merged = {key: patch_cfg.get(key) for key in SHARED_PATCH_KEYS}
    merged.update({"op": None, "value": None, "stat": None, "coef": 1.0})
    merged.update({k: entry[k] for k in GRID_ENTRY_KEYS if entry.get(k) is not None})
    return merged, parse_factor(entry.get("factor", 1))


def entry_spec(entry: dict, patch_cfg: dict, target: str) -> PatchSpec:
    return PatchSpec.from_config(*entry_patch(entry, patch_cfg), target)


def grid_specs(search: FactorSearchSettings, patch_cfg: dict, target: str) -> list[PatchSpec]:
    """Every grid entry's patch toward ``target``: fails on a bad entry before anything is scored."""
    return [entry_spec(entry, patch_cfg, target) for entry in search.grid]


def search_key(model_identity: dict, neurons_key: str | None, patch_cfg: dict, search: FactorSearchSettings) -> dict:
    """Everything that shaped a search; the saved winner is stored under it and ``factor=best`` looks it up."""
    scored = search.sample
    return {"model": model_identity, "neurons": neurons_key, "search_version": SEARCH_VERSION,
            "neuron_set": patch_cfg.get("neuron_set", "lape"), "layers": parse_layers(patch_cfg.get("layers")),
            "others_op": patch_cfg.get("others_op"), "others_value": patch_cfg.get("others_value"),
            "others_langs": patch_cfg.get("others_langs"),
            "grid": [{k: v for k, v in sorted(e.items())} for e in search.grid],
            "n_facts": scored.n_facts, "seed": scored.seed, "disjoint_from": search.disjoint_from,
            "sources": list(scored.sources), "targets": list(scored.targets), "tol": scored.tol_written}


def resolve_best(model_identity: dict, store: CacheStore, patch_cfg: dict, search: FactorSearchSettings,
                 neurons_key: str | None, search_command: str) -> tuple[tuple[dict, Factor], dict]:
    """``factor=best``: ((patch config with the winner's op/value/stat/coef, Factor) for PatchSpec.from_config,
    the winner as the job records it)."""
    meta, ran = best_under(store, BEST_FACTOR_KIND, search_key(model_identity, neurons_key, patch_cfg, search),
                           "entry", f"factor=best: no factor search matches this model, neuron set, patch "
                           f"(neuron_set, layers, others) and lss.search settings; run `{search_command}` first, "
                           f"or name a factor (factor=5, factor=pmax)")
    return entry_patch(meta["entry"], patch_cfg), ran


def factor_search(handle: ModelHandle, neurons: NeuronSet, patch_cfg: dict, search: FactorSearchSettings,
                  data_root, store: CacheStore | None,
                  neurons_key: str | None = None) -> tuple[FactorSearchResult, dict]:
    """Score every grid entry on mean off-diagonal LSS, rank them and save the winner for ``factor=best``.

    Returns the ranking and each entry's LssMatrix (name -> matrix) for the job to write."""
    from lsn_exp import lss  # torch and lm-eval: only when a search runs (preflight imports this module)

    for entry in search.grid:
        entry_spec(entry, patch_cfg, neurons.languages[0])  # fail on a bad entry before any scoring
    evaluator = lss.LssEvaluator(handle, search.sample, data_root, store, exclude_n_facts=search.disjoint_from)
    rows, matrices = [], {}
    for entry in search.grid:
        start = time.time()
        matrices[entry["name"]] = lss.lss_matrix(handle, neurons, lambda t, e=entry: entry_spec(e, patch_cfg, t),
                                                 evaluator.settings, data_root, store, evaluator=evaluator)
        rows.append(_ranking_row(entry, matrices[entry["name"]], time.time() - start))
        log.info("factor search: %s -> mean off-diagonal LSS %.3f", entry["name"], rows[-1]["mean_offdiag_lss"])
    sample = (f"{evaluator.n} facts (seed {evaluator.settings.seed}) drawn disjoint from the "
              f"{search.disjoint_from}-fact reporting sample")
    ranked = rank(rows, sample)
    best = {"name": ranked[0]["name"], "entry": ranked[0]["entry"], "mean_offdiag_lss": ranked[0]["mean_offdiag_lss"],
            "sample": sample, "ranking": [{k: r[k] for k in ("rank", "name", "mean_offdiag_lss")} for r in ranked]}
    if store is not None:
        best["path"] = str(save_winner(store, search_key(handle.identity, neurons_key, patch_cfg, search), ranked,
                                       best))
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


def save_winner(store: CacheStore, key: dict, ranked: list[dict], best: dict):
    import torch

    scores = torch.tensor([_sortable(r["mean_offdiag_lss"]) for r in ranked], dtype=torch.float64)
    return store.save(BEST_FACTOR_KIND, key, {"mean_offdiag_lss": scores}, best)


def _sortable(value) -> float:
    return float("-inf") if value is None or value != value else float(value)
