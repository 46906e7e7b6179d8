"""stage=compare: steering methods side by side on the same facts, prompts, seeds and measures.

For every target of ``compare.targets`` and every method of ``compare.methods`` (a factor plus patch / steer /
prompt overrides over the job's config): a method with a ``search`` range first has its coefficient searched
(lsn_exp.coefsearch, golden section on ``compare.search``'s objective, scored on prompts and facts disjoint from
the reported ones); then, at that coefficient, LSS over the mLAMA sources, steering success and fluency of
free generation (lsn_exp.generate) and, where ``compare.xcopa_limit`` > 0, XCOPA's self- and cross-language
accuracy deltas. The method with the best search score per target is saved; ``method=best`` runs it. One model
load; the unpatched LSS scores, continuations and XCOPA outputs are computed once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from omegaconf import OmegaConf

from lsn_exp import data, generate, lid, metrics, outputs, specs
from lsn_exp.coefsearch import CoefficientRange, best_point, golden_section, with_coefficient
from lsn_exp.downstream import DownstreamEvaluator
from lsn_exp.engine import engine_of
from lsn_exp.errors import UserError
from lsn_exp.lss import LssEvaluator
from lsn_exp.prompts import GIVEN, prompt_split
from lsn_exp.resume import best_under
from lsn_exp.settings import JobSettings
from lsn_exp.specs import Intervention

log = logging.getLogger(__name__)

SHARES = ("steering_success", "target_share", "degenerate_share")  # each with its 95% Wilson interval and n
FIELDS = ("method", "target", "domain", "intervention", "coefficient", "search_score", "final_score", "lss",
          "lss_paper", "n", "steering_success", "steering_success_ci", "target_share", "target_share_ci", "ppl",
          "repetition", "degenerate_share", "degenerate_share_ci", "lid_ceiling", "lid_agreement", "xcopa_self",
          "xcopa_cross",
          "outcomes", "seconds")
TEST_FIELDS = ("target", "domain", "method_a", "method_b", "n", "share_a", "share_b", "difference", "only_a",
               "only_b", "p", "q")
CURVE_FIELDS = ("method", "target", "path", "coefficient", "score", "steering_success", "ppl", "lss")
BEST_METHOD_KIND = "compare_best_method"
WINNER_VERSION = 3  # bump when the search or the choice of the winner changes
GENERATE_KEYS = ("sources", "prompt_words", "prompts_file", "max_new_tokens", "repetition_n", "max_repetition", "lid")


def method_intervention(job: JobSettings, method: dict, target: str, root) -> Intervention:
    """A method entry (name, factor, patch, steer, prompt) over the job's config, toward ``target``."""
    merged = {key: OmegaConf.merge(job.config[key], method.get(key) or {}) for key in ("patch", "steer", "prompt")}
    return Intervention.from_settings(target, specs.parse_factor(method.get("factor", 1)), merged["patch"],
                                      merged["steer"], merged["prompt"], root)


def winner_key(job: JobSettings, identity: dict, neurons_key: str | None, target: str) -> dict:
    """Everything that chose the best method toward ``target``, as the config wrote it; ``method=best`` recomputes
    it from its own config."""
    written, generated = job.config["compare"], job.config["generate"]
    key = {"version": WINNER_VERSION, "model": identity, "neurons": neurons_key, "target": target,
           "methods": written["methods"], "search": written["search"], "final": written["final"],
           "generate": {k: generated.get(k) for k in GENERATE_KEYS},
           "base": {k: job.config[k] for k in ("patch", "steer", "prompt")}}
    if generated.get("prompts") is not None:  # prompts written in the config
        key["generate"]["prompts"] = generated["prompts"]
    if written["search"].get("objective") == "lss":
        key["lss"] = {k: job.config["lss"].get(k) for k in ("seed", "n_facts", "sources", "tol")}
    return key


def best_method(job: JobSettings, identity: dict, store, neurons_key: str | None, target: str) -> tuple[dict, dict]:
    """``method=best``: (the method entry, at its searched coefficient, a matching compare run chose for ``target``;
    the winner as the job records it)."""
    meta, ran = best_under(store, BEST_METHOD_KIND, winner_key(job, identity, neurons_key, target), "method",
                           f"method=best: no compare run matches this model, neuron set, compare.methods and "
                           f"compare.search toward {target}; run `python -m lsn_exp +experiment=compare_methods "
                           f"model={job.model.name} compare.targets=[{target}]` first, or name a method "
                           f"(method=neurons, method=diffmean, method=prompt)")
    log.info("method=best toward %s: %s (search score %.3f)", target, meta["method"]["name"], meta["score"])
    return meta["method"], ran


class Comparison:
    """The evaluators of one model, shared by every (method, target) cell.

    Prompts: per domain, the reported block; on ``compare.search.domain`` also the search and the final block
    (lsn_exp.prompts: never overlapping). LSS: the reported facts, and for the lss objective search facts outside
    them (``lss.n_facts`` and ``compare.lss_n_facts``, whichever is larger)."""

    def __init__(self, job: JobSettings, handle, neurons, root, store):
        self.job, self.handle, self.neurons, self.root, self.store = job, handle, neurons, root, store
        opts = job.compare
        self.search, self.n_final = opts.search, opts.n_final
        self.gen_settings = replace(job.generate, n_prompts=opts.n_prompts)
        given = self.gen_settings.prompts is not None or self.gen_settings.prompts_file is not None
        self.domains = [GIVEN] if given else list(opts.domains or [self.gen_settings.domain])
        self.search_domain = GIVEN if given else self.search.domain
        self.splits = {d: prompt_split(self.gen_settings, root, None if given else d, None,
                                       self.search.n_prompts, self.n_final) for d in self.domains}
        if self.search_domain not in self.splits:
            self.splits[self.search_domain] = prompt_split(self.gen_settings, root, self.search_domain, None,
                                                           self.search.n_prompts, self.n_final)
        self.unpatched: dict = {}  # (domain, block) -> source -> unpatched generations
        self.lss = LssEvaluator(handle, replace(job.lss, n_facts=opts.lss_n_facts), root, store)
        self.search_lss = self.final_lss = None
        if self.search.objective == "lss":  # search facts, then as many fresh final facts, outside the reported
            held = reported_facts(opts.lss_n_facts, job.lss.n_facts)
            sample = replace(job.lss, n_facts=self.search.n_facts)
            self.search_lss = LssEvaluator(handle, sample, root, store, exclude_n_facts=held)
            self.final_lss = LssEvaluator(handle, sample, root, store, exclude_n_facts=held,
                                          skip_n_facts=self.search.n_facts)
        self.xcopa = None if opts.xcopa is None else DownstreamEvaluator(handle, opts.xcopa, root, store)

    def steering(self, spec, target: str, domain: str, block: str) -> tuple[dict, list[str]]:
        """The "all" summary (unpatched and patched) of ``spec`` toward ``target`` on one prompt block, and the
        patched continuations it counts."""
        prompts = getattr(self.splits[domain], block)
        summary, rows = generate.steering(self.handle, prompts, target, self.gen_settings,
                                          engine_of(self.handle).intervene(self.neurons, spec), spec.prefix,
                                          self.unpatched.setdefault((domain, block), {}), self.store)
        counted = [row[5] for row in rows if row[0] != target] or [row[5] for row in rows]
        return summary["all"], counted

    def measured(self, spec, target: str, domain: str) -> dict:
        """A row's steering measures on a domain's reported prompts, with the target's LID ceiling and how often
        the two identifiers agree on the patched continuations (lsn_exp.lid)."""
        found, texts = self.steering(spec, target, domain, "report")
        return {"domain": domain, **shown(found["patched"]), "lid_ceiling": self.ceiling(target),
                "lid_agreement": lid.agreement(texts)}

    def ceiling(self, target: str) -> float | None:
        """The share of real ``target`` text the chosen identifier labels as the target (lsn_exp.lid, cached)."""
        return lid.ceiling(self.root, target, self.gen_settings.lid)

    def objective(self, method: dict, target: str, block: str = "search") -> dict:
        """The search score of ``method`` toward ``target`` on the search (or the final) sample."""
        spec = method_intervention(self.job, method, target, self.root)
        if self.search_lss is not None:
            lss = (self.final_lss if block == "final" else self.search_lss).score(self.neurons, spec).mean
            return {"score": lss, "lss": lss, "steering_success": None, "ppl": None}
        found, _ = self.steering(spec, target, self.search_domain, block)
        patched, base = found["patched"], found["unpatched"]
        return {"score": self.search.score(patched["steering_success"], patched["ppl"], base["ppl"]), "lss": None,
                "steering_success": patched["steering_success"], "ppl": patched["ppl"]}

    def tune(self, method: dict, target: str) -> tuple[dict, float, list[dict]]:
        """(the method at its best coefficient, its search score, every evaluated point as a curve row)."""
        found = CoefficientRange.of(method)
        if found is None:
            point = self.objective(method, target)
            return method, point["score"], [{"method": method["name"], "target": target, "path": "", **point}]
        curve: list[dict] = []

        def score(x: float) -> float:
            curve.append({"method": method["name"], "target": target, "path": found.path, "coefficient": x,
                          **self.objective(with_coefficient(method, found.path, x), target)})
            log.info("search %s -> %s: %s=%.4g scores %.3f", method["name"], target, found.path, x, curve[-1]["score"])
            return curve[-1]["score"]

        x, best = best_point(golden_section(score, found.lo, found.hi, self.search.n_evals, found.log,
                                            self.search.rising))
        return {**with_coefficient(method, found.path, x), "coefficient": x}, best, curve

    def cells(self, method: dict, target: str, scores: tuple[float | None, float | None] = (None, None)) -> list[dict]:
        """One row per reported domain: LSS and XCOPA (domain-free) with each domain's steering measures."""
        start = time.time()
        spec = method_intervention(self.job, method, target, self.root)
        lss = self.lss.score(self.neurons, spec) if target in data.LSS_LANGS else None
        xcopa = self._xcopa(spec) if self.xcopa is not None and not spec.prefix else {}
        shared = {"method": method["name"], "target": target, "intervention": spec.describe(),
                  "coefficient": method.get("coefficient"), "search_score": scores[0], "final_score": scores[1],
                  "lss": None if lss is None else lss.mean, "lss_paper": None if lss is None else lss.mean_paper,
                  "xcopa_self": xcopa.get("self"), "xcopa_cross": xcopa.get("cross")}
        rows = [{**shared, **self.measured(spec, target, d)} for d in self.domains]
        for row in rows:
            row["seconds"] = round((time.time() - start) / len(rows), 1)
            log.info("compare %s -> %s (%s): LSS %s, steering %s, ppl %.1f", row["method"], target, row["domain"],
                     "—" if row["lss"] is None else f"{row['lss']:.3f}", outputs.share_text(row, "steering_success"),
                     row["ppl"] or float("nan"))
        return rows

    def _xcopa(self, spec) -> dict:
        result, _ = self.xcopa.score(self.neurons, spec)
        return result.summary().get("xcopa", {}).get("acc", {})

    def unpatched_rows(self, target: str) -> list[dict]:
        """The unpatched model's own steering toward ``target`` per domain (what every method is compared with)."""
        rows = []
        for domain in self.domains:
            prompts = self.splits[domain].report
            done = generate.fill_unpatched(self.handle, prompts, self.gen_settings,
                                           self.unpatched.setdefault((domain, "report"), {}), self.store)
            measures = generate.measures(generate.counted(done, target), target, self.gen_settings.max_repetition)
            texts = [g.text for g in generate.counted(done, target)]
            rows.append({"method": "unpatched", "target": target, "domain": domain, "intervention": "none",
                         "lss": 0.0, "lss_paper": 0.0, **shown(measures), "xcopa_self": 0.0, "xcopa_cross": 0.0,
                         "lid_ceiling": self.ceiling(target),
                         "lid_agreement": lid.agreement(texts), "seconds": 0})
        return rows


def shown(measures: dict) -> dict:
    """The measures a compare row carries (shares with n and intervals, fluency, per-prompt outcomes)."""
    keys = ("n", *SHARES, *(f"{k}_ci" for k in SHARES), "ppl", "repetition", "outcomes")
    return {k: measures.get(k) for k in keys}


def reported_facts(compare_n, lss_n) -> int | str | None:
    """The facts a compare run reports on: the larger of ``compare.lss_n_facts`` and ``lss.n_facts`` (samples of
    one seed are nested), so a search sample drawn outside them overlaps neither."""
    sizes = (compare_n, lss_n)
    if any(n is None or str(n).lower() == "all" for n in sizes):
        raise UserError("compare.search.objective=lss needs facts outside the reported ones: set compare.lss_n_facts "
                        "and lss.n_facts to numbers, not all")
    return max(int(n) for n in sizes)


def paired_tests(rows: list[dict]) -> list[dict]:
    """Every pair of methods (the unpatched model included) toward one target on one domain's same prompts: the
    exact McNemar test of their steering outcomes, with Benjamini-Hochberg q over the pairs of that target and
    domain (lsn_exp.metrics)."""
    tests = []
    for key in dict.fromkeys((r["target"], r["domain"]) for r in rows):
        group = [r for r in rows if (r["target"], r["domain"]) == key and r.get("outcomes") is not None]
        found = [{"target": key[0], "domain": key[1], "method_a": a["method"], "method_b": b["method"],
                  **metrics.mcnemar_exact(a["outcomes"], b["outcomes"])}
                 for i, a in enumerate(group) for b in group[i + 1:]]
        for test, q in zip(found, metrics.false_discovery([t["p"] for t in found])):
            test["q"] = q
        tests += found
    return tests


def compare(job: JobSettings, handle, neurons, root, store, neurons_key: str | None = None,
            progress=None) -> tuple[list[dict], list[dict], list[dict]]:
    """(every (method, target, domain) row, the unpatched model's rows first; every search evaluation; the paired
    tests). Each target's finalists (every method at its searched coefficient) are re-scored on the final prompts,
    and the best there is saved for ``method=best``; ``progress(rows, curve)`` gets what is done after each target
    (the job writes it, so a killed run keeps its finished targets)."""
    comparison = Comparison(job, handle, neurons, root, store)
    targets, methods = list(job.compare.targets), [dict(m) for m in job.compare.methods]
    rows, curve, cells = [r for t in targets for r in comparison.unpatched_rows(t)], [], {}
    for target in targets:
        tuned = [comparison.tune(method, target) for method in methods]
        curve += [point for _, _, points in tuned for point in points]
        finals = [comparison.objective(entry, target, "final")["score"] for entry, _, _ in tuned]
        for (entry, score, _), final in zip(tuned, finals):
            cells[(entry["name"], target)] = comparison.cells(entry, target, (score, final))
        save_winner(job, handle, store, neurons_key, target, tuned, finals)
        if progress is not None:
            progress(rows + [r for group in cells.values() for r in group], curve)
    rows += [r for m in methods for t in targets for r in cells[(m["name"], t)]]  # grouped by method, as before
    return rows, curve, paired_tests(rows)


def pick_winner(tuned: list, finals: list[float]) -> tuple[dict, list[dict]]:
    """(the method entry with the best score on the final prompts, every finalist ranked by it): a searched method
    is judged on a sample it was not tuned on, like an unsearched one."""
    ranking = sorted(({"name": e["name"], "search_score": s, "final_score": f}
                      for (e, s, _), f in zip(tuned, finals)), key=lambda r: -r["final_score"])
    return next(e for e, _, _ in tuned if e["name"] == ranking[0]["name"]), ranking


def save_winner(job: JobSettings, handle, store, neurons_key, target: str, tuned: list, finals: list[float]) -> None:
    """The winner on the final prompts goes to ``method=best``, with both scores of every finalist."""
    import torch

    winner, ranking = pick_winner(tuned, finals)
    score = ranking[0]["final_score"]
    if store is not None:
        store.get_or_compute(BEST_METHOD_KIND, winner_key(job, handle.identity, neurons_key, target),
                             lambda: ({"score": torch.tensor([score])},
                                      {"method": winner, "score": score, "ranking": ranking}), force=True)
    log.info("best method toward %s on the final prompts: %s (%.3f; search score %.3f)", target, winner["name"],
             score, ranking[0]["search_score"])
