"""stage=compare in-process on a tiny model: intervals, paired tests, prompt domains, disjoint samples, the final
re-score that picks the winner."""

from __future__ import annotations

import pytest
from conftest import synthetic_neurons
from hydra import compose, initialize_config_dir
from scipy.stats import binomtest

from lsn_exp import CONF_DIR, compare, data, generate, metrics, outputs, prompts
from lsn_exp.cache import CacheStore
from lsn_exp.errors import UserError
from lsn_exp.settings import generate_settings, parse_job

SMALL = ["model=tiny", "+experiment=compare_methods", "compare.targets=[fr]", "compare.lss_n_facts=2",
         "compare.n_prompts=2", "compare.xcopa_limit=0", "compare.search.n_evals=2", "compare.search.n_prompts=1",
         "compare.final.n_prompts=1", "generate.max_new_tokens=3", "lss.sources=[en,fr]", "logger=none"]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=[*SMALL, *overrides])


# --- statistics ----------------------------------------------------------------------------------------------

def test_a_share_travels_with_its_wilson_interval_and_n():
    gens = [generate.Generation("p", "t", "fr", 0.0) for _ in range(7)] + \
           [generate.Generation("p", "t", "en", 0.0) for _ in range(9)]
    found = generate.measures(gens, "fr", 0.5)
    want = binomtest(7, 16).proportion_ci(0.95, method="wilson")
    assert found["n"] == 16 and found["steering_success"] == 7 / 16
    assert found["steering_success_ci"] == pytest.approx([want.low, want.high])
    assert found["outcomes"] == "1" * 7 + "0" * 9
    assert outputs.share_text(found, "steering_success") == f"0.44 [{want.low:.2f}, {want.high:.2f}] wide"


def test_paired_tests_are_exact_mcnemar_on_the_same_prompts_with_bh_q():
    rows = [{"target": "fr", "domain": "news", "method": m, "outcomes": o}
            for m, o in (("a", "1111111100"), ("b", "0000000100"), ("c", "1111111101"))]
    tests = compare.paired_tests(rows)
    assert [(t["method_a"], t["method_b"]) for t in tests] == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = tests[0]
    assert (ab["only_a"], ab["only_b"]) == (7, 0) and ab["p"] == pytest.approx(binomtest(7, 7, 0.5).pvalue)
    assert tests[1]["p"] == 1.0 and all(t["q"] >= t["p"] for t in tests)
    with pytest.raises(ValueError):
        metrics.mcnemar_exact("10", "1")


# --- prompts: two domains, three disjoint blocks ----------------------------------------------------------------

def test_everyday_prompts_are_another_domain_in_every_default_source(data_root):
    for lang in ("en", "fr", "ja"):
        news, everyday = (set(prompts.pool(data_root, d, lang, 6)) for d in ("news", "everyday"))
        assert len(everyday) >= 44 and not news & everyday
    with pytest.raises(UserError, match="everyday prompt domain has no nl"):
        prompts.pool(data_root, "everyday", "nl", 6)


def test_prompts_written_in_the_config_are_split_so_search_and_final_never_repeat_a_reported_one(data_root):
    written = generate_settings({"prompts": {"en": [f"prompt {i}" for i in range(6)]}})
    blocks = prompts.prompt_split(written, data_root, n_search=2, n_final=1)
    assert blocks.report["en"] == ["prompt 0", "prompt 1", "prompt 2"]
    assert blocks.final["en"] == ["prompt 3"] and blocks.search["en"] == ["prompt 4", "prompt 5"]
    with pytest.raises(UserError, match="cannot give"):
        prompts.prompt_split(written, data_root, n_search=4, n_final=2)


def test_flores_blocks_are_disjoint_and_an_overlap_is_refused(data_root):
    settings = generate_settings({"sources": ["en"], "first_sentence": 0})
    blocks = prompts.prompt_split(settings, data_root, "news", 32, 4, 8)
    report, search, final = (set(b["en"]) for b in (blocks.report, blocks.search, blocks.final))
    assert len(report) == 32 and len(search) == 4 and len(final) == 8
    assert not (report & search or report & final or search & final)
    late = generate_settings({"sources": ["en"], "first_sentence": 1000})
    with pytest.raises(UserError, match="cannot give"):
        prompts.prompt_split(late, data_root, "news", 32, 4, 8)


def test_lss_search_facts_never_overlap_the_compare_facts_even_when_compare_reports_more(data_root):
    held = compare.reported_facts(30, 20)  # compare.lss_n_facts 30 > lss.n_facts 20
    searched = {d["fact_id"] for d in data.lss_docs(data_root, "en", 20, 0, exclude_n_facts=held)}
    reported = {d["fact_id"] for d in data.lss_docs(data_root, "en", 30, 0)}
    assert len(searched) == 20 and not searched & reported
    with pytest.raises(UserError, match="not all"):
        compare.reported_facts("all", 20)


def test_validation_refuses_blocks_that_cannot_be_disjoint_before_any_load(data_root):
    from lsn_exp.job import STAGES
    from lsn_exp.preflight import validate

    validate(composed(), STAGES)
    with pytest.raises(UserError, match="cannot give"):
        validate(composed("compare.n_prompts=46"), STAGES)  # + 1 search + 1 final: fr has 47 everyday openings
    with pytest.raises(UserError, match="compare.domains"):
        validate(composed("compare.domains=[sports]"), STAGES)


# --- the whole stage on a tiny model -------------------------------------------------------------------------

def test_compare_reports_each_domain_with_intervals_and_picks_the_winner_on_the_final_prompts(tiny, data_root,
                                                                                             tmp_path):
    cfg = composed("compare.methods=[{name: lape_pmax, factor: pmax},{name: diffmean, factor: 1, steer: {alpha: "
                   "0.05}, search: {path: steer.alpha, lo: 0.01, hi: 1, log: true}}]")
    neurons = synthetic_neurons(tiny, ["en", "fr", "ja"], vectors=True)
    store = CacheStore(tmp_path)
    rows, curve, tests = compare.compare(parse_job(cfg), tiny, neurons, data_root, store, "k")
    assert [(r["method"], r["domain"]) for r in rows] == [(m, d) for m in ("unpatched", "lape_pmax", "diffmean")
                                                          for d in ("news", "everyday")]
    for row in rows:
        lo, hi = row["steering_success_ci"]
        assert row["n"] == 4 and lo <= row["steering_success"] <= hi and len(row["outcomes"]) == 4
        assert row["lid_ceiling"] == 1.0 and 0 <= row["lid_agreement"] <= 1  # fr: every real piece labelled fr
    assert {r["final_score"] is not None for r in rows if r["method"] != "unpatched"} == {True}
    assert len(tests) == 6  # 3 methods -> 3 pairs, in each of 2 domains
    saved = store.load(compare.BEST_METHOD_KIND, compare.winner_key(parse_job(cfg), tiny.identity, "k", "fr"))
    ranking = saved.meta["ranking"]
    assert saved.meta["method"]["name"] == ranking[0]["name"]
    assert ranking[0]["final_score"] == max(r["final_score"] for r in ranking)


def test_the_winner_is_the_best_on_the_final_prompts_not_the_best_of_the_search():
    tuned = [({"name": "searched"}, 0.9, []), ({"name": "fixed"}, 0.5, [])]
    winner, ranking = compare.pick_winner(tuned, [0.2, 0.4])
    assert winner["name"] == "fixed" and ranking[0] == {"name": "fixed", "search_score": 0.5, "final_score": 0.4}


def test_the_lss_objectives_final_facts_are_fresh(data_root):
    held = compare.reported_facts(20, 20)
    search = {d["fact_id"] for d in data.lss_docs(data_root, "en", 10, 0, exclude_n_facts=held)}
    final = {d["fact_id"] for d in data.lss_docs(data_root, "en", 10, 0, exclude_n_facts=held, skip_n_facts=10)}
    reported = {d["fact_id"] for d in data.lss_docs(data_root, "en", 20, 0)}
    assert len(final) == 10 and not final & search and not final & reported
