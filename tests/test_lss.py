"""LSS: mLAMA prompts over all local facts, the lm-eval tasks, scores checked by hand, the cached baseline
with a no-op patch, batch-layout noise against the tolerance, and the factor search (tiny models, CPU)."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import synthetic_neurons

from lsn_exp import data, factorsearch, lmeval, lss, metrics, noops, outputs, sharedprompts
from lsn_exp.cache import CacheStore
from lsn_exp.errors import UserError
from lsn_exp.patch import Patch
from lsn_exp.results import FactorSearchResult, LssCell, LssMatrix, LssResult
from lsn_exp.settings import default_tol, factor_search_settings, lss_settings
from lsn_exp.specs import PatchSpec

SOURCES = ["en", "ja", "th"]  # a spaced language and two written without spaces before the object


@pytest.fixture(scope="module")
def neurons(tiny):
    return synthetic_neurons(tiny, list(data.LSS_LANGS))


# --- prompts and data -----------------------------------------------------------------------------

@pytest.mark.parametrize("template, subject, no_space, expected", [
    ("[X] was born in [Y] .", "Ufa", False, ("Ufa was born in", " ")),
    ("[X]は[Y]に生まれました。", "ウファ", True, ("ウファは", "")),  # [Y] not last, no space
    ("[X] เกิดใน [Y]", "อูฟา", True, ("อูฟา เกิดใน", "")),  # th: the template's space is dropped
    ("[X] est né à l'[Y] .", "Ufa", False, ("Ufa est né à l'", "")),  # no space before [Y] in the template
    ("[X], [Y] ...", " Ufa ", False, ("Ufa,", " ")),  # subject stripped
    ("[Y] is the capital of [X] .", "Ufa", False, "object_before_subject"),
    ("[X] has no object .", "Ufa", False, "template_placeholders"),
    ("[X] is [Y] .", "  ", False, "empty_subject"),
])
def test_build_prompt_cases(template, subject, no_space, expected):
    assert data.build_prompt(template, subject, no_space) == expected


def test_every_local_fact_yields_a_prompt_and_objects_in_all_15_languages(data_root):
    mlama = data.read_mlama(data_root)
    base = data_root / "mlama"
    rows = {lang: {(r["predicate_id"], r["lineid"]): r for r in map(json.loads, (
        base / "parallel15" / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines())} for lang in data.LSS_LANGS}
    templates = {lang: {r["relation"]: r["template"] for r in map(json.loads, (
        base / "templates" / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines())} for lang in data.LSS_LANGS}
    assert len(mlama.facts) + sum(mlama.excluded.values()) == len(rows["en"]) == 4916
    assert mlama.excluded == {}  # every local fact is usable (exclusions would be counted by reason)
    for fact in mlama.facts:
        relation, lineid = fact.fact_id.split(":")
        for lang in data.LSS_LANGS:
            row = rows[lang][(relation, int(lineid))]
            prompt, sep, obj = fact.prompts[lang], fact.seps[lang], fact.objects[lang]
            assert prompt and prompt == prompt.strip() and "[X]" not in prompt and "[Y]" not in prompt
            assert obj and obj == row["obj_label"].strip()
            filled = templates[lang][relation].replace("[X]", row["sub_label"].strip())
            gap = filled[len(prompt):filled.index("[Y]")]
            assert filled.startswith(prompt) and row["sub_label"].strip() in prompt and gap.strip() == ""
            assert sep == ("" if lang in data.NO_SPACE_LANGS or not gap else " "), (fact.fact_id, lang)
            assert fact.continuation(lang, lang) == sep + obj


def test_sample_is_seeded_and_spread_over_relations(data_root):
    facts = data.read_mlama(data_root).facts
    a, b, c = (data.sample_facts(facts, 185, seed) for seed in (0, 0, 1))
    assert len(a) == 185 and [f.fact_id for f in a] == [f.fact_id for f in b] != [f.fact_id for f in c]
    available, picked = {}, {}
    for fact in facts:
        available[fact.relation] = available.get(fact.relation, 0) + 1
    for fact in a:
        picked[fact.relation] = picked.get(fact.relation, 0) + 1
    top = max(picked.values())
    assert len(available) == 40 and set(picked) == set(available)  # every relation is represented
    assert all(min(available[r], top - 1) <= picked.get(r, 0) <= top for r in available)  # round robin
    assert len(data.sample_facts(facts, "all", 0)) == len(facts)
    with pytest.raises(UserError, match="n_facts"):
        data.sample_facts(facts, 0, 0)


def test_lss_tasks_load_through_the_task_manager(data_root):
    manager = lmeval.task_manager(metadata={"data_root": str(data_root), "n_facts": 3, "seed": 0})
    assert {f"lss_{lang}" for lang in data.LSS_LANGS} <= set(manager.all_tasks)
    tasks = manager.load(["lss_en", "lss_ja"])["tasks"]
    for source, sep in (("en", " "), ("ja", "")):
        task = tasks[f"lss_{source}"]
        docs = list(task.eval_docs)
        assert len(docs) == 3
        instances = lmeval.build_instances(task)
        assert len(instances) == 3 * 15
        for inst in instances:
            doc = docs[inst.doc_id]
            assert inst.args == (doc["prompt"], doc["choices"][inst.idx])
            assert inst.args[1].startswith(sep) and inst.args[1].strip() == inst.args[1][len(sep):]


# --- lm-eval scoring -----------------------------------------------------------------------------

def _lss_instances(data_root, sources=("en", "th"), n_facts=3):
    manager = lmeval.task_manager(metadata={"data_root": str(data_root), "n_facts": n_facts, "seed": 0})
    tasks = manager.load([f"lss_{s}" for s in sources])["tasks"]
    return [i for t in tasks.values() for i in lmeval.build_instances(t)]


def _plain_hflm_scores(handle, instances, batch_size=8):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=handle.model, tokenizer=handle.tokenizer, batch_size=batch_size)
    return [answer for answer in lm.loglikelihood(instances, disable_tqdm=True)]


def test_whole_row_path_scores_like_plain_hflm_with_mask_and_fewer_logits(tiny, data_root):
    instances = _lss_instances(data_root)
    seen = []
    hook = tiny.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    lm = lmeval.hflm(tiny, 8)
    lm.share_prompts = False
    try:
        ours = lmeval.loglikelihoods(lm, instances)
    finally:
        hook.remove()
    plain = [ll for ll, _ in _plain_hflm_scores(tiny, instances)]
    assert np.allclose(ours, plain, atol=1e-5, rtol=0)
    assert seen and all(kw["attention_mask"].ndim == 2 for kw in seen)
    keep = [kw["logits_to_keep"] for kw in seen]  # bool [B, T]: each row's continuation positions only
    assert all(k.dtype == torch.bool and k.shape == kw["input_ids"].shape for k, kw in zip(keep, seen))
    assert sum(int(k.sum()) for k in keep) < sum(k.numel() for k in keep) / 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", *(  # three more shapes in `make test-slow`
    pytest.param(f, marks=pytest.mark.slow) for f in ("mistral", "gemma", "gemma2"))])
def test_shared_prompt_path_matches_plain_hflm(family, data_root):
    """Each context once + continuations from the KV cache = HFLM's whole rows, to fp32 layout noise;
    greedy flags too. 15 objects per prompt, 1..n-token continuations, three scripts."""
    from conftest import load_tiny

    handle = load_tiny(family)
    instances = _lss_instances(data_root, ("en", "ja", "th"))
    calls = []
    hook = handle.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape),
                                                  with_kwargs=True)
    try:
        ours = lmeval.hflm(handle, 4).loglikelihood(instances, disable_tqdm=True)
    finally:
        hook.remove()
    plain = _plain_hflm_scores(handle, instances)
    assert np.allclose([o[0] for o in ours], [p[0] for p in plain], atol=1e-5, rtol=1e-6)  # fp32 sums
    assert [o[1] for o in ours] == [p[1] for p in plain]
    assert sum(s[0] for s in calls) < len(instances)  # rows fed: far fewer than one per request


def test_shared_prompt_path_under_a_patch_and_whole_rows_for_a_statistic(tiny, neurons, data_root):
    instances = _lss_instances(data_root)
    lm = lmeval.hflm(tiny, 8)
    for spec in (PatchSpec(target="fr", op="set", source="pmax"), PatchSpec(target="fr", op="mul", value=3.0),
                 PatchSpec(target="fr", op="set", stat="max")):
        with Patch(tiny, neurons, spec):
            ours = lmeval.loglikelihoods(lm, instances)
            plain = [ll for ll, _ in _plain_hflm_scores(tiny, instances, batch_size=1)]  # no padding at all
        assert np.allclose(ours, plain, atol=1e-5, rtol=1e-6), spec
    def tokens_fed(lm, patch=None):  # positions the model runs, padding included
        rows = []
        hook = tiny.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].numel()),
                                                    with_kwargs=True)
        try:
            with patch or contextlib.nullcontext():
                lmeval.loglikelihoods(lm, instances)
        finally:
            hook.remove()
        return sum(rows)

    whole = lmeval.hflm(tiny, 8)
    whole.share_prompts = False
    stat_patch = Patch(tiny, neurons, PatchSpec(target="fr", op="set", stat="max"))
    assert tokens_fed(lm, stat_patch) == tokens_fed(whole) > 2 * tokens_fed(lm)  # a statistic: whole rows


def test_cell_stats_by_hand():
    # shifts 0.5, -0.2, 0.0005 (within tol: no win), 2.0, and two same-string facts (NaN: skipped)
    cell = metrics.lss_cell("en", "fr", [0.5, np.nan, -0.2, 0.0005, np.nan, 2.0], tol=1e-3, n_boot=500, seed=0)
    assert isinstance(cell, LssCell) and (cell.source, cell.target) == ("en", "fr")
    assert cell.lss == 0.5 and cell.wins == 2 and cell.n == 4 and cell.skipped == 2
    assert cell.within_tol == 1 and cell.mean_shift == pytest.approx((0.5 - 0.2 + 0.0005 + 2.0) / 4)
    assert 0.0 <= cell.ci_low <= 0.5 <= cell.ci_high <= 1.0
    # the paper's rule: any shift above 0 wins (0.0005 too), a same-string fact is a non-win: 3 of all 6 facts
    assert cell.lss_paper == pytest.approx(3 / 6) and cell.wins_paper == 3
    assert 0.0 <= cell.lss_paper_ci_low <= 3 / 6 <= cell.lss_paper_ci_high <= 1.0
    assert cell.outcomes == "1s00s1" and cell.outcomes_paper == "100101"



def test_the_paper_rule_counts_every_positive_shift_ours_only_those_above_tol():
    """intervention_dod.py eval_dod: a win is a shift > 0 over all facts; ours needs a shift > tol."""
    tol = 5e-2
    cell = metrics.lss_cell("en", "fr", [tol / 2, tol, 2 * tol, 0.0, -tol / 2, np.nan], tol=tol, n_boot=0, seed=0)
    assert (cell.wins, cell.n, cell.lss) == (1, 5, 0.2)  # ours: only 2 tol
    assert cell.lss_paper == pytest.approx(3 / 6)  # the paper: tol / 2, tol and 2 tol of all 6 facts
    assert cell.wins_paper == 3 and cell.outcomes_paper == "111000"
    paper = metrics.lss_cell("en", "fr", [0.5, 0.5], tol=tol, n_boot=0, seed=0, paper_shift=[1e-3, np.nan])
    assert (paper.lss, paper.lss_paper, paper.outcomes_paper) == (1.0, 0.5, "10")  # its own requests' shifts


def test_paper_format_requests_put_a_space_before_the_object_where_ours_do_not(tiny, data_root):
    """intervention_dod.py calculate_logprob scores prompt + " " + object in every language: for ja (our
    separator is empty) the paper's requests are scored beside ours; en (already spaced) adds none."""
    docs = data.lss_docs(data_root, "ja", 3)
    assert all(c == " " + o.lstrip() and not o.startswith(" ") for d in docs
               for c, o in zip(d["paper_choices"], d["choices"]))
    evaluator = lss.LssEvaluator(tiny, lss_settings({"n_facts": 3, "sources": ["en", "ja"]}), data_root, None)
    keep, plain, _ = evaluator._requests_toward("fr")
    facts = data.sample_facts(data.read_mlama(data_root).facts, 3, 0)
    ours = [(facts[i].prompts[s], facts[i].continuation(s, o)) for s in ("en", "ja") for i in keep[s] for o in (s, "fr")]
    paper = [(facts[i].prompts["ja"], " " + facts[i].objects[o]) for i in keep["ja"] for o in ("ja", "fr")]
    assert [inst.args for inst in plain] == ours + paper

# --- three hand-made facts, LSS computed by hand -----------------------------------------------------

HAND_FACTS = [  # (subject, objects by language); en and fr share "Canada", so that cell skips fact 2
    ({"en": "Ufa", "fr": "Oufa", "ja": "ウファ"}, {"en": "Russia", "fr": "Russie", "ja": "ロシア"}),
    ({"en": "Toronto", "fr": "Toronto", "ja": "トロント"}, {"en": "Canada", "fr": "Canada", "ja": "カナダ"}),
    ({"en": "Lyon", "fr": "Lyon", "ja": "リヨン"}, {"en": "France", "fr": "la France", "ja": "フランス"}),
]


@pytest.fixture(scope="module")
def hand_root(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("hand_mlama")
    shutil.copytree(data_root / "mlama" / "templates", root / "mlama" / "templates")
    (root / "mlama" / "parallel15").mkdir(parents=True)
    for lang in data.LSS_LANGS:
        rows = [{"predicate_id": "P17", "lineid": i, "uuid": f"u{i}", "sub_uri": f"Qs{i}",
                 "sub_label": subjects.get(lang, subjects["en"]), "obj_uri": f"Qo{i}",
                 "obj_label": objects.get(lang, objects["en"] + "-" + lang)}
                for i, (subjects, objects) in enumerate(HAND_FACTS)]
        (root / "mlama" / "parallel15" / f"{lang}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


@torch.inference_mode()
def logprob(handle, prompt: str, continuation: str) -> float:
    """log P(continuation | prompt), tokenized as lm-eval does: the continuation is whole[len(ctx):]."""
    ctx = handle.tokenizer.encode(prompt)
    whole = handle.tokenizer.encode(prompt + continuation)
    logits = handle.model(torch.tensor([whole[:-1]])).logits[0].double().log_softmax(-1)  # [T, vocab]
    cont = whole[len(ctx):]
    return sum(logits[len(ctx) - 1 + k, tok].item() for k, tok in enumerate(cont))


def test_three_hand_made_facts_match_lss_computed_by_hand(tiny, neurons, hand_root):
    langs = ["en", "fr", "ja"]
    cfg = lss_settings({"n_facts": "all", "sources": langs, "targets": langs, "bootstrap": 200, "batch_size": 4})
    spec_for = lambda t: PatchSpec(t, op="mul", value=8.0)  # noqa: E731
    result = lss.lss_matrix(tiny, neurons, spec_for, cfg, hand_root, store=None)
    assert isinstance(result, LssMatrix)
    matrix, matrix_paper = result.matrix("lss"), result.matrix("lss_paper")
    mlama = data.read_mlama(hand_root)
    assert len(mlama.facts) == 3
    tol = default_tol(torch.float32)
    def delta(f, s, t, paper):  # log P(obj_t) - log P(obj_s) after prompt_s, ours or in the paper's format
        cont = (lambda o: " " + f.objects[o]) if paper else (lambda o: f.continuation(s, o))  # noqa: E731
        return logprob(tiny, f.prompts[s], cont(t)) - logprob(tiny, f.prompts[s], cont(s))

    for target in langs:
        with Patch(tiny, neurons, spec_for(target)):
            patched = {(s, i, paper): delta(f, s, target, paper) for i, f in enumerate(mlama.facts) for s in langs
                       for paper in (False, True)}
        for source in (s for s in langs if s != target):
            wins = n = paper_wins = 0
            shifts = []
            for i, fact in enumerate(mlama.facts):
                if fact.objects[source] == fact.objects[target]:
                    continue  # ours: skipped; the paper's: a shift of exactly 0, a non-win
                n += 1
                shifts.append(patched[(source, i, False)] - delta(fact, source, target, False))
                wins += shifts[-1] > tol
                paper_wins += patched[(source, i, True)] - delta(fact, source, target, True) > 0
            cell = next(c for c in result.cells if c.source == source and c.target == target)
            assert (cell.n, cell.skipped) == (n, 3 - n)
            assert cell.wins == wins and cell.lss == pytest.approx(wins / n)
            assert cell.wins_paper == paper_wins and cell.lss_paper == pytest.approx(paper_wins / 3)  # all 3 facts
            assert matrix_paper[source][target] == pytest.approx(paper_wins / 3)
            assert cell.mean_shift == pytest.approx(np.mean(shifts), abs=1e-4)
            assert matrix[source][target] == pytest.approx(wins / n)
    en_fr = next(c for c in result.cells if c.source == "en" and c.target == "fr")
    assert en_fr.skipped == 1  # "Canada" in both
    assert matrix["en"]["en"] is None


# --- the cached baseline: a no-op is exactly 0; batch layouts differ only within the tolerance ---------

NOOPS = [PatchSpec("x", op="mul", value=1.0),  # installs nothing
         PatchSpec("x", op="add", stat="max", coef=0.0)]  # runs a hook on every layer and adds 0


def test_noop_patch_gives_lss_zero_everywhere_with_the_cached_baseline(tiny, neurons, data_root, tmp_path):
    store = CacheStore(tmp_path)
    cfg = lss_settings({"n_facts": 4, "sources": SOURCES, "targets": SOURCES, "bootstrap": 100})
    first = lss.LssEvaluator(tiny, replace(cfg, batch_size=16), data_root, store)
    first.unpatched.ensure(["en"])  # a job toward en: the en column and each source's own
    assert first.unpatched.cached == {s: False for s in SOURCES}
    assert len(list((tmp_path / lss.UNPATCHED_KIND).glob("*/meta.json"))) == 5  # en<-en, ja<-en/ja, th<-en/th
    assert np.isnan(first.unpatched.columns["en"][:, data.LSS_LANGS.index("ja")]).all()
    first.unpatched.ensure(SOURCES)
    cached = lss.LssEvaluator(tiny, replace(cfg, batch_size=3), data_root, store)  # another batch layout
    cached.unpatched.ensure(SOURCES)
    assert cached.unpatched.cached == {s: True for s in SOURCES}
    for s in SOURCES:
        assert np.array_equal(cached.unpatched.columns[s], first.unpatched.columns[s], equal_nan=True)
    meta = json.loads(next((tmp_path / lss.UNPATCHED_KIND).glob("*/meta.json")).read_text())
    assert meta["spec"]["model"] == tiny.identity and meta["meta"]["provenance"]["data_files"]
    for noop in NOOPS:
        result = lss.lss_matrix(tiny, neurons, lambda t, n=noop: PatchSpec(t, op=n.op, value=n.value, stat=n.stat,
                                                                               coef=n.coef),
                                cfg, data_root, store, evaluator=cached)
        assert all(c.lss == 0.0 and c.wins == 0 and c.within_tol == c.n for c in result.cells)
        assert result.mean_offdiag == 0.0 and result.mean_offdiag_paper == 0.0 and len(result.cells) == 6


def test_batch_size_1_and_16_differ_only_within_the_tolerance(tiny, neurons, data_root):
    cfg = lss_settings({"n_facts": 5, "sources": SOURCES, "bootstrap": 0})
    one = lss.LssEvaluator(tiny, replace(cfg, batch_size=1), data_root, store=None)
    sixteen = lss.LssEvaluator(tiny, replace(cfg, batch_size=16), data_root, store=None)
    tol = one.settings.tol
    for evaluator in (one, sixteen):
        evaluator.unpatched.ensure(data.LSS_LANGS)
    for s in SOURCES:
        assert np.abs(one.unpatched.columns[s] - sixteen.unpatched.columns[s]).max() < tol / 10
    for target, spec in [(t, spec) for t in ("en", "ja") for spec in (
            PatchSpec(t, op="set", source="pmax"),  # shared prompts: KV cache, left-padded contexts
            PatchSpec(t, op="set", stat="max"))]:  # per-sample statistic: whole rows with the attention mask
        a, _, _, _ = one.deltas(neurons, spec)
        b, _, _, _ = sixteen.deltas(neurons, spec)
        for source in a:
            shift_a, shift_b = a[source], b[source]
            assert np.array_equal(np.isnan(shift_a), np.isnan(shift_b))
            scored = ~np.isnan(shift_a)
            shift_a, shift_b = shift_a[scored], shift_b[scored]
            assert np.abs(shift_a - shift_b).max() < tol / 10
            differ = (shift_a > tol) != (shift_b > tol)
            # a fact may flip only where its shift lies within the layout noise of the tolerance
            assert np.all(np.abs(shift_a[differ] - tol) <= np.abs(shift_a - shift_b)[differ])
            if not differ.any():
                ca = metrics.lss_cell(source, target, a[source], tol, 0, 0)
                cb = metrics.lss_cell(source, target, b[source], tol, 0, 0)
                assert ca.lss == cb.lss and ca.lss_paper == cb.lss_paper


# --- matrix outputs and the factor search -------------------------------------------------------------

SEARCH_CFG = {"n_facts": 10, "bootstrap": 50, "search": {
    "n_facts": 3, "sources": ["en", "ja"], "targets": ["en", "ja"],
    "grid": [{"name": "x5", "factor": 5}, {"name": "set0", "op": "set", "value": 0.0},
             {"name": "pmax", "factor": "pmax"}, {"name": "noop", "factor": 1}]}}
SEARCH = factor_search_settings(SEARCH_CFG)


def test_factor_search_ranks_the_grid_and_saves_the_best(tiny, neurons, data_root, tmp_path):
    store = CacheStore(tmp_path / "cache")
    lape = {"neuron_set": "lape"}
    with pytest.raises(UserError, match="run `python -m lsn_exp stage=factor_search model=tiny` first"):
        factorsearch.resolve_best(tiny.identity, store, lape, SEARCH, "neurons", "python -m lsn_exp stage="
                            "factor_search model=tiny")
    out, matrices = factorsearch.factor_search(tiny, neurons, lape, SEARCH, data_root, store, neurons_key="neurons")
    assert isinstance(out, FactorSearchResult) and list(matrices) == ["x5", "set0", "pmax", "noop"]
    for name, matrix in matrices.items():  # what the factor_search job step writes (lsn_exp.job)
        assert isinstance(matrix, LssMatrix)
        outputs.lss_matrix_files(matrix, tmp_path / "factor_search", f"LSS {name}", prefix=f"lss_{name}")
    outputs.ranking_csv(out.ranking, tmp_path)
    ranking = out.ranking
    assert [r["rank"] for r in ranking] == [1, 2, 3, 4]
    scores = [r["mean_offdiag_lss"] for r in ranking]
    assert scores == sorted(scores, reverse=True) and next(r for r in ranking if r["name"] == "noop")[
        "mean_offdiag_lss"] == 0.0
    assert out.n_facts == 3 and (tmp_path / "factor_search" / "lss_x5_matrix.png").exists()
    searched = set(out.fact_ids)
    reported = {f.fact_id for f in data.sample_facts(data.read_mlama(data_root).facts, 10, 0)}
    assert len(searched) == 3 and not searched & reported  # the scored facts, not only the label, are disjoint
    table = (tmp_path / "factor_ranking.csv").read_text()
    assert "disjoint from the 10-fact reporting sample" in table and "mean_offdiag_lss_paper" in table
    (patch_cfg, factor), _ = factorsearch.resolve_best(tiny.identity, store, lape, SEARCH, "neurons", "")
    spec = PatchSpec.from_config(patch_cfg, factor, "ja")
    assert spec == factorsearch.entry_spec(out.best["entry"], lape, "ja")


@pytest.mark.parametrize("change", [
    {"patch": {"neuron_set": "baseline"}}, {"patch": {"layers": "0-1"}},
    {"patch": {"others_op": "set", "others_value": 0.0}}, {"lss": {"search": {"n_facts": 4}}},
    {"lss": {"search": {"targets": ["en", "fr"]}}}, {"lss": {"search": {"sources": ["en", "fr"]}}},
    {"lss": {"n_facts": 12}}, {"lss": {"seed": 1}}, {"lss": {"tol": 0.01}},
    {"lss": {"search": {"grid": [{"name": "x5", "factor": 5}]}}}, {"model": {"seed": 99}}, {"neurons": "other"}])
def test_factor_best_never_resolves_a_search_run_with_other_settings(change, tiny, neurons, data_root, tmp_path):
    """The winner is keyed by everything that shaped its search, so any difference finds no winner."""
    from omegaconf import OmegaConf

    store = CacheStore(tmp_path)
    lape = {"neuron_set": "lape"}
    factorsearch.factor_search(tiny, neurons, lape, SEARCH, data_root, store, neurons_key="neurons")
    patch_cfg = OmegaConf.to_container(OmegaConf.merge(lape, change.get("patch", {})))
    lss_cfg = OmegaConf.merge(SEARCH_CFG, change.get("lss", {}))
    if "grid" in str(change):
        lss_cfg.search.grid = change["lss"]["search"]["grid"]
    identity = {**tiny.identity, **change.get("model", {})}
    with pytest.raises(UserError, match="no factor search matches"):
        factorsearch.resolve_best(identity, store, patch_cfg, factor_search_settings(lss_cfg),
                                  change.get("neurons", "neurons"), "")
    factorsearch.resolve_best(tiny.identity, store, lape, SEARCH, "neurons", "")  # the search's own settings do


def test_search_sample_is_disjoint_from_the_reporting_sample(data_root):
    facts = data.read_mlama(data_root).facts
    report = {f.fact_id for f in data.sample_facts(facts, 185, 0)}
    searched = data.sample_facts(facts, 40, 0, exclude_n_facts=185)
    assert len(searched) == 40 and not report & {f.fact_id for f in searched}
    assert [f.fact_id for f in searched] == [f.fact_id for f in data.sample_facts(facts, 40, 0, exclude_n_facts=185)]
    docs = data.lss_docs(data_root, "en", 40, 0, exclude_n_facts=185)
    assert {d["fact_id"] for d in docs} == {f.fact_id for f in searched}
    with pytest.raises(UserError, match="left beside the reporting sample"):
        data.sample_facts(facts, len(facts) - 100, 0, exclude_n_facts=185)


def test_matrix_outputs_and_user_errors(tiny, neurons, data_root, tmp_path):
    cfg = lss_settings({"n_facts": 2, "sources": ["en", "fr"], "targets": ["fr"], "bootstrap": 20})
    result = lss.lss_matrix(tiny, neurons, lambda t: PatchSpec(t, op="mul", value=5.0), cfg, data_root, None)
    assert isinstance(result, LssMatrix)
    tables, images = outputs.lss_matrix_files(result, tmp_path, "tiny x5")
    assert set(result.matrix()) == {"en", "fr"} and result.matrix()["fr"]["fr"] is None
    assert images["lss/heatmap"].exists() and tables["lss/matrix"].exists()
    lines = tables["lss/matrix"].read_text().splitlines()
    assert lines[0] == "source\\target,fr" and lines[1].startswith("en,") and lines[2] == "fr,"
    stored = json.loads(json.dumps(result.to_json()))  # plain data for results.json
    assert stored["matrix"] == result.matrix() and LssMatrix.from_json(stored) == result
    single = lss.lss_for_target(tiny, neurons, PatchSpec("en", op="mul", value=5.0), cfg, data_root, None)
    assert isinstance(single, LssResult)
    assert set(single.by_source("lss")) == {"fr"} and single.mean == single.by_source("lss")["fr"]
    cells_table = outputs.cells_csv(list(single.cells), tmp_path / "lss_en_cells.csv")
    assert cells_table.read_text().startswith("source,target,lss,ci_low,ci_high,lss_paper")
    with open(cells_table, newline="") as handle:
        assert next(csv.DictReader(handle))["outcomes"] == single.cells[0].outcomes
    stored = LssResult.from_json(json.loads(json.dumps(single.to_json())))  # results.json holds the cells
    assert stored.cells[0].outcomes == single.cells[0].outcomes and stored == single
    assert tables["lss/matrix_paper"].exists() and images["lss/heatmap_paper"].exists()
    for bad, match in (({"sources": ["en", "xx"]}, "lss.sources"), ({"n_facts": "many"}, "lss.n_facts"),
                       ({"n_facts": 0}, "lss.n_facts"), ({"n_facts": -3}, "lss.n_facts"), ({"tol": -1}, "lss.tol"),
                       ({"tol": "nan"}, "lss.tol"), ({"targets": ["xx"]}, "lss.targets")):
        with pytest.raises(UserError, match=match):
            lss_settings(bad)
    with pytest.raises(UserError, match="not an LSS language"):
        lss.LssEvaluator(tiny, cfg, data_root, None).score(neurons, PatchSpec("sw", op="mul", value=2.0))


def test_continuation_batches_respect_the_row_and_token_caps():
    rows = [(0, tuple(range(n))) for n in (200, 40, 40, 33, 5, 5, 5, 2, 2)]  # longest first, as scored
    batches = list(sharedprompts._row_batches(rows, batch_size=2))  # caps: 8 rows, 64 padded positions
    assert [r for batch in batches for r in batch] == rows
    for batch in batches:
        width = len(batch[0][1]) - 1
        assert len(batch) == 1 or (len(batch) <= 8 and len(batch) * width <= 64)
    assert [len(b) for b in batches] == [1, 1, 1, 2, 4]  # widths 199, 39, 39, 32 (2 x 32 = 64), 4


@pytest.mark.parametrize("share_prompts", [True, False])
def test_bf16_log_probs_are_taken_in_float32_from_the_bf16_logits(share_prompts, data_root):
    """In bf16 a log-prob near -12 (a 262k vocabulary) rounds to steps of 0.0625 nats: scores must be the
    float32 log-softmax of the model's bf16 logits, on the shared-prompt path and on whole rows."""
    from conftest import load_tiny

    handle = load_tiny("llama")
    handle.model.to(torch.bfloat16)
    lm = lmeval.hflm(handle, 1)
    lm.share_prompts = share_prompts

    def n_tokens(inst):
        context, continuation = inst.args
        return len(lm.tok_encode(context + continuation)) - len(lm.tok_encode(context))

    inst = max(_lss_instances(data_root, ("en",), n_facts=1), key=n_tokens)  # one prompt, its longest object
    captured = []
    hook = handle.model.lm_head.register_forward_hook(lambda m, i, out: captured.append(out.detach()))
    try:
        (score, _), = lm.loglikelihood([inst], disable_tqdm=True)
    finally:
        hook.remove()
    context, continuation = inst.args
    tokens = lm.tok_encode(context + continuation)[len(lm.tok_encode(context)):]
    rows = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])[-len(tokens):]  # the scored positions
    assert rows.dtype == torch.bfloat16 and len(tokens) > 1
    expected = sum(rows[k].double().log_softmax(-1)[tok].item() for k, tok in enumerate(tokens))
    assert score == pytest.approx(expected, abs=1e-4)


def test_bf16_noop_is_exactly_zero_with_the_paired_layout(data_root, tmp_path):
    """16-bit models score the unpatched requests in the patched run's own layout, so a no-op is exactly 0
    however much bf16 batch layout moves a score; the paired scores are cached per target."""
    from conftest import load_tiny

    handle = load_tiny("llama")
    handle.model.to(torch.bfloat16)
    store = CacheStore(tmp_path)
    art = synthetic_neurons(handle, list(data.LSS_LANGS))
    cfg = lss_settings({"n_facts": 4, "sources": SOURCES, "targets": ["en", "ja"], "bootstrap": 0})
    evaluator = lss.LssEvaluator(handle, cfg, data_root, store)
    assert evaluator.paired_layout()
    noop = lss.lss_matrix(handle, art, lambda t: PatchSpec(t, op="mul", value=1.0), cfg, data_root, store,
                          evaluator=evaluator)
    assert all(c.wins == 0 and c.within_tol == c.n for c in noop.cells) and noop.mean_offdiag == 0.0
    shifts, _, _, _ = evaluator.deltas(art, PatchSpec("ja", op="mul", value=1.0))
    assert all(np.nanmax(np.abs(shift)) == 0.0 for shift in shifts.values())  # bit-identical, not just within tol
    assert len(list((tmp_path / lss.UNPATCHED_KIND).glob("*/meta.json"))) >= 2  # one paired entry per target
    patched = lss.lss_matrix(handle, art, lambda t: PatchSpec(t, op="mul", value=8.0), cfg, data_root, store,
                             evaluator=evaluator)
    assert patched.mean_offdiag > 0


# --- bf16: every patch kind's no-op gives LSS exactly 0 (the unpatched run in the patched run's layout) -----

@pytest.fixture(scope="module")
def bf16_dead(data_root, tmp_path_factory):
    """A tiny relu model at a trained model's logit scale, in bf16, whose lape neurons (3% of each layer, random)
    never fire (lsn_exp.noops.dead_neurons); one evaluator with one store for every kind (a layout must never
    reuse another layout's paired unpatched scores)."""
    from conftest import load_tiny

    handle = load_tiny("llama", hidden_act="relu")  # relu: a row's 10th percentile is exactly 0
    with torch.no_grad():
        handle.model.lm_head.weight.mul_(60.0)  # logits of std ~10, as in a trained model: layout noise shows
    handle.model.to(torch.bfloat16)
    shape = (len(data.LSS_LANGS), handle.adapter.n_layers, handle.adapter.d_ff)
    lape = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.03
    cfg = lss_settings({"n_facts": 8, "sources": SOURCES, "targets": ["ja"], "bootstrap": 0})
    evaluator = lss.LssEvaluator(handle, cfg, data_root, CacheStore(tmp_path_factory.mktemp("bf16_store")))
    with noops.dead_neurons(handle, lape, data.LSS_LANGS) as art:
        yield evaluator, art


NOOP_KINDS = {kind.name: kind.build for kind in noops.kinds(relu=True)}  # the list scripts/gpu_check.py runs too


@pytest.mark.parametrize("kind", list(NOOP_KINDS))
def test_every_patch_kind_noop_gives_lss_exactly_0_in_bf16(kind, bf16_dead):
    evaluator, art = bf16_dead
    spec = NOOP_KINDS[kind]("ja")
    found = evaluator.shifts(art, spec)
    assert found.paper["th"] is not found.ours["th"]  # th: the paper's format has its own requests
    for source, shift in [*found.ours.items(), *found.paper.items()]:
        scored = shift[~np.isnan(shift)]
        assert scored.size and np.all(scored == 0.0), (source, scored[scored != 0])
    cells = [metrics.lss_cell(source, "ja", shift, evaluator.settings.tol, 0, 0, paper_shift=found.paper[source])
             for source, shift in found.ours.items()]  # as LssEvaluator.score makes them
    assert all(c.wins == 0 and c.lss == 0.0 and c.lss_paper == 0.0 and c.mean_shift == 0.0 for c in cells)
