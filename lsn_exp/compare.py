"""stage=compare: steering methods side by side on the same facts, prompts, seeds and measures.

For every method of ``compare.methods`` (a factor plus patch / steer / prompt overrides over the job's config) and
every target of ``compare.targets``: LSS over the mLAMA sources, steering success and fluency of free
generation (lsn_exp.generate), and, where ``compare.xcopa_limit`` > 0, XCOPA's self- and cross-language
accuracy deltas. One model load; the unpatched LSS scores, continuations and XCOPA outputs are computed once.
"""

from __future__ import annotations

import logging
import time

from omegaconf import OmegaConf

from lsn_exp import data, generate, settings
from lsn_exp.downstream import DownstreamEvaluator
from lsn_exp.lss import LssEvaluator
from lsn_exp.patch import PatchSpec
from lsn_exp.steer import Intervention, SteerSpec, intervene

log = logging.getLogger(__name__)

FIELDS = ("method", "target", "intervention", "lss", "lss_paper", "steering_success", "target_share", "ppl",
          "repetition", "degenerate_share", "xcopa_self", "xcopa_cross", "seconds")


def method_intervention(cfg, method: dict, target: str, root) -> Intervention:
    """A method entry (name, factor, patch, steer, prompt) over the job's config, toward ``target``."""
    merged = {key: OmegaConf.merge(cfg[key], method.get(key) or {}) for key in ("patch", "steer", "prompt")}
    prompt = merged["prompt"]
    return Intervention(PatchSpec.from_config(merged["patch"], settings.parse_factor(method.get("factor", 1)), target),
                        SteerSpec.from_config(OmegaConf.to_container(merged["steer"]), target), str(prompt.mode),
                        data.prompt_prefix(prompt.mode, target, root, int(prompt.sentence)))


class Comparison:
    """The evaluators of one model, shared by every (method, target) cell."""

    def __init__(self, cfg, handle, artifact, root, store):
        self.cfg, self.handle, self.artifact, self.root = cfg, handle, artifact, root
        opts = cfg.compare
        self.lss = LssEvaluator(handle, {**OmegaConf.to_container(cfg.lss, resolve=True), "n_facts": opts.lss_n_facts},
                                root, store)
        gen_cfg = {**OmegaConf.to_container(cfg.generate, resolve=True), "n_prompts": opts.n_prompts}
        self.gen_settings = settings.generate_settings(gen_cfg)
        self.prompts = generate.prompt_sets(self.gen_settings, root)
        self.unpatched: dict = {}
        self.xcopa = None if not opts.xcopa_limit else DownstreamEvaluator(
            handle, {"tasks": ["xcopa"], "limit": int(opts.xcopa_limit), "bootstrap": 0}, root, store)

    def cell(self, method: dict, target: str) -> dict:
        start = time.time()
        spec = method_intervention(self.cfg, method, target, self.root)
        lss = self.lss.score(self.artifact, spec) if target in data.LSS_LANGS else None
        summary, _ = generate.steering(self.handle, self.prompts, target, self.gen_settings,
                                       intervene(self.handle, self.artifact, spec), spec.prefix, self.unpatched)
        patched = summary["all"]["patched"]
        xcopa = self._xcopa(spec) if self.xcopa is not None and not spec.prefix else {}
        row = {"method": method["name"], "target": target, "intervention": spec.describe(),
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
        for source, texts in self.prompts.items():  # generated once, shared with every method's cell
            if source not in self.unpatched:
                self.unpatched[source] = generate.generate_labelled(self.handle, texts, s.max_new_tokens, None,
                                                                    s.repetition_n)
        measures = generate.measures([g for gens in self.unpatched.values() for g in gens], target, s.max_repetition)
        return {"method": "unpatched", "target": target, "intervention": "none", "lss": 0.0, "lss_paper": 0.0,
                **{k: measures[k] for k in ("steering_success", "target_share", "ppl", "repetition",
                                            "degenerate_share")}, "xcopa_self": 0.0, "xcopa_cross": 0.0, "seconds": 0}


def compare(cfg, handle, artifact, root, store) -> list[dict]:
    """Every (method, target) row, the unpatched model's rows first."""
    comparison = Comparison(cfg, handle, artifact, root, store)
    targets = list(cfg.compare.targets)
    rows = [comparison.unpatched_row(t) for t in targets]
    for method in OmegaConf.to_container(cfg.compare.methods, resolve=True):
        rows += [comparison.cell(method, target) for target in targets]
    return rows
