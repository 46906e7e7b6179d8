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

from omegaconf import OmegaConf

from lsn_exp import data, generate, settings
from lsn_exp.coefsearch import CoefficientRange, SearchSettings, best_point, golden_section, with_coefficient
from lsn_exp.downstream import DownstreamEvaluator
from lsn_exp.errors import UserError
from lsn_exp.lss import LssEvaluator
from lsn_exp.patch import PatchSpec
from lsn_exp.steer import Intervention, SteerSpec, intervene

log = logging.getLogger(__name__)

FIELDS = ("method", "target", "intervention", "coefficient", "search_score", "lss", "lss_paper", "steering_success",
          "target_share", "ppl", "repetition", "degenerate_share", "xcopa_self", "xcopa_cross", "seconds")
CURVE_FIELDS = ("method", "target", "path", "coefficient", "score", "steering_success", "ppl", "lss")
BEST_METHOD_KIND = "compare_best_method"
WINNER_VERSION = 2  # bump when the search or the choice of the winner changes
GENERATE_KEYS = ("sources", "prompt_words", "prompts_file", "max_new_tokens", "repetition_n", "max_repetition")


def method_intervention(cfg, method: dict, target: str, root) -> Intervention:
    """A method entry (name, factor, patch, steer, prompt) over the job's config, toward ``target``."""
    merged = {key: OmegaConf.merge(cfg[key], method.get(key) or {}) for key in ("patch", "steer", "prompt")}
    prompt = merged["prompt"]
    return Intervention(PatchSpec.from_config(merged["patch"], settings.parse_factor(method.get("factor", 1)), target),
                        SteerSpec.from_config(OmegaConf.to_container(merged["steer"]), target), str(prompt.mode),
                        data.prompt_prefix(prompt.mode, target, root, int(prompt.sentence)))


def winner_key(cfg, identity: dict, artifact_key: str | None, target: str) -> dict:
    """Everything that chose the best method toward ``target``; ``method=best`` recomputes it from its config."""
    search = settings.plain(cfg.compare.search)
    key = {"version": WINNER_VERSION, "model": identity, "neurons": artifact_key, "target": target,
           "methods": OmegaConf.to_container(cfg.compare.methods, resolve=True), "search": search,
           "generate": {k: settings.plain(cfg.generate).get(k) for k in GENERATE_KEYS},
           "base": {k: settings.plain(cfg[k]) for k in ("patch", "steer", "prompt")}}
    if settings.plain(cfg.generate).get("prompts") is not None:  # prompts written in the config
        key["generate"]["prompts"] = settings.plain(cfg.generate)["prompts"]
    if search.get("objective") == "lss":
        key["lss"] = {k: settings.plain(cfg.lss).get(k) for k in ("seed", "n_facts", "sources", "tol")}
    return key


def best_method(cfg, identity: dict, store, artifact_key: str | None, target: str) -> dict:
    """``method=best``: the method entry (at its searched coefficient) a matching compare run chose for ``target``."""
    found = None if store is None else store.load(BEST_METHOD_KIND, winner_key(cfg, identity, artifact_key, target))
    if found is None:
        raise UserError(f"method=best: no compare run matches this model, neuron artifact, compare.methods and "
                        f"compare.search toward {target}; run `python -m lsn_exp +experiment=compare_methods "
                        f"model={cfg.model.name} compare.targets=[{target}]` first, or name a method "
                        f"(method=neurons, method=diffmean, method=prompt)")
    log.info("method=best toward %s: %s (search score %.3f)", target, found.meta["method"]["name"], found.meta["score"])
    return found.meta["method"]


class Comparison:
    """The evaluators of one model, shared by every (method, target) cell."""

    def __init__(self, cfg, handle, artifact, root, store):
        self.cfg, self.handle, self.artifact, self.root, self.store = cfg, handle, artifact, root, store
        opts = cfg.compare
        gen_cfg = {**settings.plain(cfg.generate), "n_prompts": opts.n_prompts}
        self.gen_settings = settings.generate_settings(gen_cfg)
        self.search = SearchSettings.of(settings.plain(opts.search))
        search_gen = settings.generate_settings({**gen_cfg, "n_prompts": self.search.n_prompts,
                                                 "first_sentence": self.search.first_sentence})
        self.prompts, self.search_prompts = (generate.prompt_sets(s, root) for s in (self.gen_settings, search_gen))
        self.unpatched: dict = {}
        self.search_unpatched: dict = {}
        lss_cfg = settings.plain(cfg.lss)
        self.lss = LssEvaluator(handle, {**lss_cfg, "n_facts": opts.lss_n_facts}, root, store)
        self.search_lss = None if self.search.objective != "lss" else LssEvaluator(
            handle, {**lss_cfg, "n_facts": self.search.n_facts}, root, store, exclude_n_facts=lss_cfg.get("n_facts"))
        self.xcopa = None if not opts.xcopa_limit else DownstreamEvaluator(
            handle, {"tasks": ["xcopa"], "limit": int(opts.xcopa_limit), "bootstrap": 0}, root, store)

    def objective(self, method: dict, target: str) -> dict:
        """The search score of ``method`` toward ``target`` on the search sample (with what it is made of)."""
        spec = method_intervention(self.cfg, method, target, self.root)
        if self.search_lss is not None:
            lss = self.search_lss.score(self.artifact, spec).mean
            return {"score": lss, "lss": lss, "steering_success": None, "ppl": None}
        summary, _ = generate.steering(self.handle, self.search_prompts, target, self.gen_settings,
                                       intervene(self.handle, self.artifact, spec), spec.prefix, self.search_unpatched,
                                       self.store)
        patched, base = summary["all"]["patched"], summary["all"]["unpatched"]
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

    def cell(self, method: dict, target: str, search_score: float | None = None) -> dict:
        start = time.time()
        spec = method_intervention(self.cfg, method, target, self.root)
        lss = self.lss.score(self.artifact, spec) if target in data.LSS_LANGS else None
        summary, _ = generate.steering(self.handle, self.prompts, target, self.gen_settings,
                                       intervene(self.handle, self.artifact, spec), spec.prefix, self.unpatched,
                                       self.store)
        patched = summary["all"]["patched"]
        xcopa = self._xcopa(spec) if self.xcopa is not None and not spec.prefix else {}
        row = {"method": method["name"], "target": target, "intervention": spec.describe(),
               "coefficient": method.get("coefficient"), "search_score": search_score,
               "lss": None if lss is None else lss.mean, "lss_paper": None if lss is None else lss.mean_paper,
               **{k: patched[k] for k in ("steering_success", "target_share", "ppl", "repetition", "degenerate_share")},
               "xcopa_self": xcopa.get("self"), "xcopa_cross": xcopa.get("cross"),
               "seconds": round(time.time() - start, 1)}
        log.info("compare %s -> %s: LSS %s, steering %.2f (raw %.2f), ppl %.1f", method["name"], target,
                 "—" if row["lss"] is None else f"{row['lss']:.3f}", row["steering_success"], row["target_share"],
                 row["ppl"] or float("nan"))
        return row

    def _xcopa(self, spec) -> dict:
        result, _ = self.xcopa.score(self.artifact, spec)
        return result.summary().get("xcopa", {}).get("acc", {})

    def unpatched_row(self, target: str) -> dict:
        """The unpatched model's own steering success toward ``target`` (what every method is compared with)."""
        s = self.gen_settings
        generate.fill_unpatched(self.handle, self.prompts, s, self.unpatched, self.store)  # once, for every cell
        measures = generate.measures(generate.counted(self.unpatched, target), target, s.max_repetition)
        return {"method": "unpatched", "target": target, "intervention": "none", "lss": 0.0, "lss_paper": 0.0,
                **{k: measures[k] for k in ("steering_success", "target_share", "ppl", "repetition",
                                            "degenerate_share")}, "xcopa_self": 0.0, "xcopa_cross": 0.0, "seconds": 0}


def compare(cfg, handle, artifact, root, store, artifact_key: str | None = None,
            progress=None) -> tuple[list[dict], list[dict]]:
    """(every (method, target) row, the unpatched model's rows first; every search evaluation). The method with
    the best search score toward each target is saved for ``method=best``; ``progress(rows, curve)`` gets what
    is done after each target (the job writes it, so a killed run keeps its finished targets)."""
    import torch

    comparison = Comparison(cfg, handle, artifact, root, store)
    targets, methods = list(cfg.compare.targets), OmegaConf.to_container(cfg.compare.methods, resolve=True)
    rows, curve, cells = [comparison.unpatched_row(t) for t in targets], [], {}
    for target in targets:
        tuned = [comparison.tune(method, target) for method in methods]
        curve += [point for _, _, points in tuned for point in points]
        cells.update({(entry["name"], target): comparison.cell(entry, target, score) for entry, score, _ in tuned})
        winner, score, _ = max(tuned, key=lambda t: t[1])
        if store is not None:
            ranking = sorted(((e["name"], s) for e, s, _ in tuned), key=lambda p: -p[1])
            store.get_or_compute(BEST_METHOD_KIND, winner_key(cfg, handle.identity, artifact_key, target),
                                 lambda: ({"score": torch.tensor([score])},
                                          {"method": winner, "score": score, "ranking": ranking}), force=True)
        log.info("best method toward %s on the search sample: %s (%.3f)", target, winner["name"], score)
        if progress is not None:
            progress(rows + list(cells.values()), curve)
    rows += [cells[(m["name"], t)] for m in methods for t in targets]  # grouped by method, as before
    return rows, curve
