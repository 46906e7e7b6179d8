"""A bounded 1-D coefficient search (golden section) over one number of a method entry.

A ``compare.methods`` entry with ``search: {path: steer.alpha, lo: 0.01, hi: 0.5, log: true}`` is scored at
``compare.search.n_evals`` coefficients chosen by golden-section search on [lo, hi] (log-spaced when ``log``),
instead of a fixed grid. Golden section assumes one peak; with n evaluations the peak is bracketed to
(hi - lo) x 0.618^(n - 2) of the range (in log space when ``log``). Pure Python: no torch here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

from lsn_exp.errors import UserError

INV_PHI = (math.sqrt(5) - 1) / 2  # 0.618...: the share of the bracket kept per evaluation
SEARCHABLE = ("factor", "steer.alpha", "patch.value", "patch.coef")  # multiply, vector alpha, add/set value, stat coef
OBJECTIVES = ("steering", "lss")


def golden_section(objective: Callable[[float], float], lo: float, hi: float, n_evals: int,
                   log: bool = False, rising: Callable[[float], bool] | None = None) -> list[tuple[float, float]]:
    """Maximise ``objective`` on [lo, hi] in ``n_evals`` evaluations; every (x, objective(x)) in evaluation order.

    A tie between the two inner points moves toward ``lo`` (the smaller intervention), unless ``rising(score)``
    says the tied score lies on the rising side of a plateau (the steering objective: 0 while nothing steers yet,
    negative past the fluency bound), where the peak is toward ``hi``."""
    to_x = math.exp if log else float
    a, b = (math.log(lo), math.log(hi)) if log else (float(lo), float(hi))
    points: list[tuple[float, float]] = []

    def evaluate(u: float) -> float:
        points.append((to_x(u), float(objective(to_x(u)))))
        return points[-1][1]

    if n_evals == 1:
        evaluate((a + b) / 2)
        return points
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = evaluate(c), evaluate(d)
    while len(points) < n_evals:
        if fc > fd or (fc == fd and not (rising and rising(fc))):  # the peak lies in [a, d]
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = evaluate(c)
        else:  # the peak lies in [c, b]
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = evaluate(d)
    return points


def bracket(lo: float, hi: float, n_evals: int, log: bool = False) -> float:
    """How closely ``n_evals`` evaluations pin a single peak: the final bracket's width (log units when ``log``)."""
    width = math.log(hi / lo) if log else hi - lo
    return width * INV_PHI ** max(n_evals - 2, 0)


def best_point(points: list[tuple[float, float]]) -> tuple[float, float]:
    """The highest-scoring (x, score); ties go to the smaller x."""
    return max(points, key=lambda p: (p[1] if p[1] == p[1] else -math.inf, -p[0]))  # NaN scores last


@dataclass(frozen=True)
class CoefficientRange:
    """Which number of a method entry the search varies, and its bounds."""

    path: str
    lo: float
    hi: float
    log: bool = False

    @classmethod
    def of(cls, method: dict) -> CoefficientRange | None:
        """The entry's ``search`` (None when it has none), every mistake as a one-line UserError."""
        spec = method.get("search")
        if not spec:
            return None
        where = f"compare.methods {method.get('name')!r} search"
        if spec.get("path") not in SEARCHABLE:
            raise UserError(f"{where}: path={spec.get('path')!r} is not searchable; use one of {', '.join(SEARCHABLE)}")
        try:
            found = cls(str(spec["path"]), float(spec["lo"]), float(spec["hi"]), bool(spec.get("log", False)))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: give numbers lo and hi, e.g. {{path: steer.alpha, lo: 0.01, hi: 0.5, log: true}}")
        if not found.lo < found.hi or (found.log and found.lo <= 0):
            raise UserError(f"{where}: needs lo < hi (and lo > 0 with log: true), got lo={found.lo} hi={found.hi}")
        return found


def with_coefficient(method: dict, path: str, value: float) -> dict:
    """A copy of ``method`` with the number at ``path`` (``factor`` or ``group.key``) set to ``value``."""
    entry = copy.deepcopy({k: v for k, v in method.items() if k != "search"})
    if "." not in path:
        entry[path] = value
        return entry
    group, key = path.split(".", 1)
    entry[group] = {**(entry.get(group) or {}), key: value}
    return entry


@dataclass(frozen=True)
class SearchSettings:
    """``compare.search``: the objective and the sample it is scored on (disjoint from what is reported)."""

    objective: str  # steering: steering success, 0 or below past the fluency bound | lss: the target's mean LSS
    n_evals: int  # evaluations per searched method and target
    n_prompts: int  # generation prompts per source (steering objective): the last of the domain's pool
    domain: str  # the prompt domain searched on (lsn_exp.prompts.DOMAINS)
    n_facts: int  # LSS facts (lss objective), drawn outside the reported samples
    max_ppl_ratio: float  # fluency bound: the continuations' perplexity at most this x the unpatched model's

    @classmethod
    def of(cls, cfg: dict) -> SearchSettings:
        known = {"objective", "n_evals", "n_prompts", "domain", "n_facts", "max_ppl_ratio"}
        if set(cfg) - known:
            raise UserError(f"compare.search has unknown key(s) {sorted(set(cfg) - known)}: use {sorted(known)}")
        try:
            found = cls(str(cfg.get("objective", "steering")), _whole(cfg.get("n_evals", 5)),
                        _whole(cfg.get("n_prompts", 4)), str(cfg.get("domain", "news")), _whole(cfg.get("n_facts", 20)),
                        float(cfg.get("max_ppl_ratio", 3.0)))
        except (TypeError, ValueError):
            raise UserError("compare.search: n_evals, n_prompts and n_facts must be whole numbers, max_ppl_ratio a "
                            "number") from None
        if found.objective not in OBJECTIVES:
            raise UserError(f"compare.search.objective={found.objective} is not allowed: use {' or '.join(OBJECTIVES)}")
        if min(found.n_evals, found.n_prompts, found.n_facts) < 1 or not found.max_ppl_ratio > 0:
            raise UserError("compare.search: n_evals, n_prompts and n_facts must be >= 1, max_ppl_ratio > 0")
        return found

    def rising(self, score: float) -> bool:
        """A tie at this score means the peak lies toward larger coefficients (steering: not yet past the bound)."""
        return self.objective == "steering" and score >= 0

    def score(self, steering_success: float, ppl: float | None, unpatched_ppl: float | None) -> float:
        """Steering objective: the success while the perplexity stays within the bound, else how far past it
        (negative, so the search backs off a coefficient that only babbles)."""
        if ppl is None or unpatched_ppl is None or ppl <= self.max_ppl_ratio * unpatched_ppl:
            return steering_success
        return -(ppl / (self.max_ppl_ratio * unpatched_ppl) - 1)


def _whole(raw) -> int:
    if isinstance(raw, bool) or float(raw) != int(raw):
        raise ValueError(raw)
    return int(raw)


def check_compare(compare_cfg: dict, domains: tuple[str, ...]) -> SearchSettings:
    """``compare``'s search settings, every method's range, the prompt domains and the final sample's size (that
    the prompt blocks do not overlap is checked against the data: lsn_exp.prompts.check_blocks)."""
    found = SearchSettings.of(compare_cfg.get("search") or {})
    for method in compare_cfg.get("methods") or []:
        CoefficientRange.of(method)
    for name, value in (("compare.search.domain", [found.domain]), ("compare.domains", compare_cfg.get("domains"))):
        if not value or any(d not in domains for d in value):
            raise UserError(f"{name}={value} is not allowed: use prompt domains from {', '.join(domains)}")
    final = (compare_cfg.get("final") or {}).get("n_prompts")
    if isinstance(final, bool) or not isinstance(final, int) or final < 1:
        raise UserError(f"compare.final.n_prompts={final!r} is not allowed: use a whole number >= 1")
    return found
