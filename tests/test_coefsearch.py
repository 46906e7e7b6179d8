"""The golden-section coefficient search and the settings of compare's search (pure Python, no model)."""

from __future__ import annotations

import math

import pytest

from lsn_exp.coefsearch import (CoefficientRange, SearchSettings, best_point, bracket, check_compare,
                                golden_section, with_coefficient)
from lsn_exp.errors import UserError


def counted(f):
    calls = []

    def wrapped(x):
        calls.append(x)
        return f(x)
    return wrapped, calls


@pytest.mark.parametrize("n_evals", [3, 5, 8, 12])
def test_golden_section_brackets_a_known_peak_in_the_stated_evaluations(n_evals):
    objective, calls = counted(lambda x: -(x - 0.3) ** 2)
    points = golden_section(objective, 0.0, 1.0, n_evals)
    assert len(calls) == len(points) == n_evals
    x, _ = best_point(points)
    assert abs(x - 0.3) <= bracket(0.0, 1.0, n_evals)
    assert bracket(0.0, 1.0, n_evals) == pytest.approx(0.618034 ** (n_evals - 2), rel=1e-5)


def test_golden_section_on_a_log_scale_finds_a_peak_across_decades():
    # peak at alpha = 0.04 on [0.001, 1]: three decades, log-unimodal
    points = golden_section(lambda a: -(math.log(a) - math.log(0.04)) ** 2, 0.001, 1.0, 10, log=True)
    x, _ = best_point(points)
    assert len(points) == 10 and all(0.001 <= p <= 1.0 for p, _ in points)
    assert abs(math.log(x / 0.04)) <= bracket(0.001, 1.0, 10, log=True)
    assert abs(x - 0.04) < 0.004


def test_golden_section_reuses_its_inner_point_and_breaks_ties_toward_lo():
    points = golden_section(lambda x: 0.0, 0.0, 1.0, 4)  # flat: every step keeps the lower part
    xs = [p for p, _ in points]
    assert xs[0] < xs[1] and xs[2] < xs[0] and xs[3] < xs[2]
    assert best_point(points)[0] == min(xs)
    assert golden_section(lambda x: x, 2.0, 4.0, 1) == [(3.0, 3.0)]
    assert best_point([(1.0, float("nan")), (2.0, 0.1)]) == (2.0, 0.1)


def test_with_coefficient_sets_the_path_on_a_copy():
    method = {"name": "diffmean", "factor": 1, "steer": {"alpha": 0.1, "scale": "unit"},
              "search": {"path": "steer.alpha", "lo": 0.01, "hi": 1}}
    tuned = with_coefficient(method, "steer.alpha", 0.25)
    assert tuned == {"name": "diffmean", "factor": 1, "steer": {"alpha": 0.25, "scale": "unit"}}
    assert method["steer"]["alpha"] == 0.1 and "search" in method
    assert with_coefficient({"name": "m"}, "factor", 7.0) == {"name": "m", "factor": 7.0}
    assert with_coefficient({"name": "m"}, "patch.value", 2.0) == {"name": "m", "patch": {"value": 2.0}}


@pytest.mark.parametrize("search, message", [
    ({"path": "steer.layers", "lo": 0, "hi": 1}, "not searchable"),
    ({"path": "factor", "lo": 5, "hi": 1}, "needs lo < hi"),
    ({"path": "factor", "lo": 0, "hi": 1, "log": True}, "lo > 0"),
    ({"path": "factor", "hi": 1}, "give numbers lo and hi"),
])
def test_a_bad_search_range_is_one_clear_error(search, message):
    with pytest.raises(UserError, match=message):
        CoefficientRange.of({"name": "m", "search": search})


def test_the_steering_objective_goes_negative_past_the_fluency_bound():
    s = SearchSettings.of({"max_ppl_ratio": 2.0})
    assert s.score(0.75, ppl=5.0, unpatched_ppl=3.0) == 0.75  # within 2 x 3.0
    assert s.score(0.75, ppl=9.0, unpatched_ppl=3.0) == pytest.approx(-0.5)  # 50 % past the bound
    assert s.score(0.75, ppl=12.0, unpatched_ppl=3.0) < s.score(0.75, ppl=9.0, unpatched_ppl=3.0)
    with pytest.raises(UserError, match="objective=bleu"):
        SearchSettings.of({"objective": "bleu"})


def test_compare_settings_name_known_domains_and_a_final_sample():
    domains = ("news", "everyday")
    found = check_compare({"search": {"domain": "everyday"}, "domains": ["news"], "final": {"n_prompts": 8}}, domains)
    assert found.domain == "everyday"
    for bad, match in (({"domains": ["sports"], "final": {"n_prompts": 8}}, "compare.domains"),
                       ({"domains": [], "final": {"n_prompts": 8}}, "compare.domains"),
                       ({"search": {"domain": "x"}, "domains": ["news"], "final": {"n_prompts": 8}}, "search.domain"),
                       ({"domains": ["news"], "final": {"n_prompts": 0}}, "final.n_prompts"),
                       ({"search": {"first_sentence": 500}, "domains": ["news"], "final": {"n_prompts": 8}}, "unknown")):
        with pytest.raises(UserError, match=match):
            check_compare(bad, domains)


def test_a_plateau_tie_moves_toward_the_peak_it_says_is_further_on():
    # the steering objective's shape: 0 until the method steers, a narrow peak, negative past the fluency bound
    def steering(alpha):
        return 0.0 if alpha < 0.0055 else 0.25 if alpha < 0.0075 else -(alpha - 0.0075) * 100

    left = golden_section(steering, 0.002, 0.1, 6, log=True)  # ties at 0 go to lo: the peak is missed
    found = golden_section(steering, 0.002, 0.1, 6, log=True, rising=lambda score: score >= 0)
    assert best_point(left)[1] == 0.0 and best_point(found)[1] == 0.25
    assert SearchSettings.of({"objective": "steering"}).rising(0.0)
    assert not SearchSettings.of({"objective": "steering"}).rising(-0.1)
    assert not SearchSettings.of({"objective": "lss"}).rising(0.0)
