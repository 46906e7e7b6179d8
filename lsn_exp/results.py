"""What stages hand each other and what results.json holds: frozen dataclasses with ``to_json``/``from_json``.

``to_json`` adds the derived numbers a reader wants to see (means, matrices, summaries); ``from_json``
ignores them and rebuilds them from the stored fields, so a results.json reads back into the same object.
Only the standard library and numpy here: the report reads results without torch or lm-eval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1  # bump when a stored field changes meaning or name
RESULTS_FILE = "results.json"  # in every run dir


def num(value) -> float | None:
    """A float for JSON: NaN and None become None."""
    return None if value is None or value != value else float(value)


class Serializable:
    """``to_json``: the dataclass as plain data; ``from_json``: the stored fields back (unknown keys ignored)."""

    def to_json(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: dict):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Skipped(Serializable):
    """A stage that had nothing to score, and why."""

    skipped: str


@dataclass(frozen=True)
class PatchSummary(Serializable):
    """The patch a score was taken under: label, neuron counts and how it ran."""

    patch: str  # e.g. id:lape:set=pmax
    layers: list[int]
    neurons: int
    neurons_per_layer: list[int]
    others_neurons: int
    weight_edit_layers: int
    hook_layers: int
    steer: str | None = None  # the steering vector added with the patch (lsn_exp.steer), if any
    steer_norm_ratio: dict | None = None  # layer -> the mean share of the vector's norm the model dtype kept


def _patch(data: dict | None) -> PatchSummary | None:
    return None if data is None else PatchSummary.from_json(data)


# --- LSS -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LssCell(Serializable):
    """LSS(source -> target) over one sample of facts (lsn_exp.metrics.lss_cell)."""

    source: str
    target: str
    n: int  # scored facts (the two objects differ)
    skipped: int  # facts whose source and target objects are the same string
    wins: int
    within_tol: int  # |shift| <= tol
    outcomes: str  # one character per fact of the sample: 1 win, 0 no win, s skipped
    lss: float  # wins / n
    ci_low: float
    ci_high: float
    lss_paper: float  # the paper's rule and prompt format on our sample: shifts > 0 / all facts
    lss_paper_ci_low: float
    lss_paper_ci_high: float
    mean_shift: float
    wins_paper: int | None = None  # facts won under the paper's rule (None: results before LSS_VERSION 4)
    outcomes_paper: str = ""  # one character per fact: 1 win, 0 no win, under the paper's rule ("" before)


def mean_over(cells, key: str) -> float:
    """Mean of ``key`` over the cells that scored at least one fact (NaN when none did)."""
    values = [getattr(c, key) for c in cells if c.n > 0]
    return sum(values) / len(values) if values else float("nan")


def _cells(data: list[dict]) -> tuple[LssCell, ...]:
    return tuple(LssCell.from_json(c) for c in data)


@dataclass(frozen=True)
class LssResult(Serializable):
    """LSS(s -> target) for every source s != target, under one patch."""

    target: str
    patch: PatchSummary
    cells: tuple[LssCell, ...]
    tol: float
    n_facts: int
    fact_ids: list[str]
    requests: int
    wall_time_s: float
    unpatched_cached: dict[str, bool] = field(default_factory=dict)  # source -> unpatched scores from the cache
    data: dict = field(default_factory=dict)  # the mLAMA summary: usable facts, exclusions

    @property
    def mean(self) -> float:
        return mean_over(self.cells, "lss")

    @property
    def mean_paper(self) -> float:
        return mean_over(self.cells, "lss_paper")

    def by_source(self, key: str = "lss") -> dict[str, float]:
        return {c.source: getattr(c, key) for c in self.cells}

    def to_json(self) -> dict:
        return {**asdict(self), "mean": self.mean, "mean_paper": self.mean_paper, "lss": self.by_source("lss"),
                "lss_paper": self.by_source("lss_paper")}

    @classmethod
    def from_json(cls, data: dict) -> LssResult:
        base = super().from_json(data)
        return replace(base, patch=_patch(data["patch"]), cells=_cells(data["cells"]))


@dataclass(frozen=True)
class LssMatrix(Serializable):
    """The sources x targets LSS matrix of one patch recipe (one patched run per target)."""

    sources: list[str]
    targets: list[str]
    cells: tuple[LssCell, ...]
    tol: float
    n_facts: int
    fact_ids: list[str]
    per_target: dict[str, dict] = field(default_factory=dict)  # target -> mean, mean_paper, patch, neurons
    n_weakest: int = 5
    unpatched_cached: dict[str, bool] = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    patched_wall_time_s: float = 0.0

    mean_offdiag = LssResult.mean  # over the scored cells: the diagonal is never scored
    mean_offdiag_paper = LssResult.mean_paper

    def weakest(self, k: int) -> list[LssCell]:
        """The ``k`` scored cells with the lowest LSS (ties by source, then target)."""
        return sorted((c for c in self.cells if c.n > 0), key=lambda c: (c.lss, c.source, c.target))[:k]

    def matrix(self, key: str = "lss") -> dict[str, dict[str, float | None]]:
        """``matrix[source][target]`` = the cell's ``key`` (None where not scored)."""
        return cell_matrix(self.cells, self.sources, self.targets, key)

    def to_json(self) -> dict:
        weakest = [{k: getattr(c, k) for k in ("source", "target", "lss", "ci_low", "ci_high", "n", "lss_paper")}
                   for c in self.weakest(self.n_weakest)]
        return {**asdict(self), "matrix": self.matrix("lss"), "matrix_paper": self.matrix("lss_paper"),
                "mean_offdiag": self.mean_offdiag, "mean_offdiag_paper": self.mean_offdiag_paper, "weakest": weakest}

    @classmethod
    def from_json(cls, data: dict) -> LssMatrix:
        return replace(super().from_json(data), cells=_cells(data["cells"]))


def cell_matrix(cells, sources: list[str], targets: list[str], key: str) -> dict[str, dict[str, float | None]]:
    values = {(c.source, c.target): getattr(c, key) for c in cells if c.n > 0}
    return {s: {t: values.get((s, t)) for t in targets} for s in sources}


@dataclass(frozen=True)
class FactorSearchResult(Serializable):
    """Every grid entry ranked by mean off-diagonal LSS on a sample disjoint from the reporting one."""

    ranking: list[dict]  # rank, name, mean_offdiag_lss, mean_offdiag_lss_paper, min_cell, patch, sample, entry
    best: dict  # name, entry, mean_offdiag_lss, sample, ranking, path (the saved winner)
    sample: str
    n_facts: int
    fact_ids: list[str]
    unpatched_cached: dict[str, bool] = field(default_factory=dict)


# --- downstream ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricDelta(Serializable):
    """One metric of one task: patched value ± stderr, unpatched value ± stderr, delta ± paired stderr."""

    value: float | None
    stderr: float | None
    base: float | None
    base_stderr: float | None
    delta: float | None
    delta_stderr: float | None


@dataclass(frozen=True)
class TaskScore(Serializable):
    """One task language of one family, patched vs unpatched."""

    family: str
    lang: str
    n: int
    self_language: bool  # the task language is the patched language
    metrics: dict[str, MetricDelta]
    unpatched_cached: bool
    bleu_tokenizer: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> TaskScore:
        metrics = {m: MetricDelta.from_json(d) for m, d in data["metrics"].items()}
        return replace(super().from_json(data), metrics=metrics)


@dataclass(frozen=True)
class DownstreamResult(Serializable):
    """Every selected task under one patch (or none), against the cached unpatched outputs."""

    target: str | None
    patch: PatchSummary | None
    tasks: dict[str, TaskScore]
    skipped: dict[str, str]  # family -> why it was not scored
    settings: dict
    wall_time_s: float
    data_root: str

    def summary(self) -> dict[str, dict[str, dict]]:
        """family -> metric -> the self-language delta (and stderr) and the mean delta over the other languages."""
        import numpy as np

        out: dict[str, dict[str, dict]] = {}
        for task in self.tasks.values():
            for metric, cell in task.metrics.items():
                out.setdefault(task.family, {}).setdefault(metric, {"self": None, "_cross": []})
                entry = out[task.family][metric]
                if task.self_language:
                    entry.update(self=cell.delta, self_stderr=cell.delta_stderr, self_base=cell.base,
                                 self_value=cell.value)
                elif cell.delta is not None:
                    entry["_cross"].append(cell)
        for metrics in out.values():
            for entry in metrics.values():
                cross = entry.pop("_cross")
                for key, attr in (("cross", "delta"), ("cross_base", "base"), ("cross_value", "value")):
                    entry[key] = num(float(np.mean([getattr(c, attr) for c in cross]))) if cross else None
                entry["n_cross"] = len(cross)
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "summary": self.summary()}

    @classmethod
    def from_json(cls, data: dict) -> DownstreamResult:
        tasks = {name: TaskScore.from_json(t) for name, t in data["tasks"].items()}
        return replace(super().from_json(data), tasks=tasks, patch=_patch(data.get("patch")))


# --- what a job step returns, and how results.json reads back -------------------------------------------

@dataclass
class StageOutput:
    """A job step's results (stage name -> typed result or plain dict) and the files it wrote."""

    results: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Path] = field(default_factory=dict)  # W&B key -> CSV
    images: dict[str, Path] = field(default_factory=dict)  # W&B key -> PNG
    data_files: list[Path] = field(default_factory=list)  # hashed into provenance
    artifacts: dict[str, Path] = field(default_factory=dict)  # W&B artifact type -> folder (the neuron set)


TYPES = {"lss": LssResult, "lss_matrix": LssMatrix, "factor_search": FactorSearchResult,
         "downstream": DownstreamResult}


def to_json(results: dict[str, Any]) -> dict:
    """Stage results as results.json stores them."""
    return {k: v.to_json() if isinstance(v, Serializable) else v for k, v in results.items()}


def from_json(results: dict) -> dict[str, Any]:
    """results.json's stage results back as typed objects (stages without a type stay dicts)."""
    out = {}
    for key, value in results.items():
        kind = Skipped if isinstance(value, dict) and set(value) == {"skipped"} else TYPES.get(key)
        out[key] = kind.from_json(value) if kind is not None and isinstance(value, dict) else value
    return out
