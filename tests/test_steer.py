"""DiffMean steering vectors: recorded means, the vector, alpha = 0, composing with a neuron patch, restoring."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny

from lsn_exp import identify, neuronset
from lsn_exp.cache import CacheStore
from lsn_exp.errors import UserError
from lsn_exp.settings import identify_settings, lss_settings
from lsn_exp.specs import Intervention, PatchSpec, SteerSpec
from lsn_exp.steer import intervene, steering_vectors

LANGS = ["en", "fr", "ja"]


@pytest.fixture(scope="module")
def handle():
    return load_tiny("llama")


@pytest.fixture(scope="module")
def neurons(handle, data_root, tmp_path_factory):


    cfg = identify_settings({"languages": LANGS, "max_tokens": 400, "n_stat_sentences": 5})
    store = CacheStore(tmp_path_factory.mktemp("store"))
    return identify.build(cfg, handle, data_root, store, seed=0).neurons


def encode(handle, texts):
    return dict(handle.tokenizer(texts, padding=True, return_tensors="pt"))


@torch.inference_mode()
def logits(handle, batch):
    return handle.model(**batch).logits


def test_diffmean_is_the_target_mean_minus_the_average_of_the_other_languages(neurons):
    means = neurons.resid_mean.double()  # [K, L, d_model]
    for k, code in enumerate(LANGS):
        others = [means[j] for j in range(len(LANGS)) if j != k]
        want = means[k] - sum(others) / len(others)
        torch.testing.assert_close(neurons.diffmean(code).double(), want, atol=1e-6, rtol=1e-6)


def test_the_artifact_keeps_residual_means_through_the_cache(handle, neurons, data_root, tmp_path):
    tensors, meta = neuronset.artifact_to_tensors(neurons)
    again = neuronset.artifact_from_tensors(tensors, meta)
    assert torch.equal(again.resid_mean, neurons.resid_mean) and torch.equal(again.resid_norm, neurons.resid_norm)
    assert again.resid_mean.shape == (3, handle.adapter.n_layers, handle.model.config.hidden_size)


@pytest.mark.parametrize("scale", ["none", "unit", "resid_norm"])
def test_steering_vectors_scale_as_documented(neurons, scale):
    spec = SteerSpec("ja", alpha=2.0, layers=(1, 3), scale=scale)
    vectors = steering_vectors(neurons, spec, neurons.n_layers)
    assert sorted(vectors) == [1, 3]
    raw = neurons.diffmean("ja")[3]
    want = {"none": 2.0 * raw.norm(), "unit": torch.tensor(2.0),
            "resid_norm": 2.0 * neurons.resid_norm[:, 3].mean()}[scale]
    torch.testing.assert_close(vectors[3].norm(), want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vectors[3] / vectors[3].norm(), raw / raw.norm(), rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_bit_identical_and_a_steer_changes_the_output(handle, neurons):
    batch = encode(handle, ["The weather today is", "Le temps"])
    before = logits(handle, batch)
    noop = Intervention(PatchSpec("ja", op="mul", value=1.0), SteerSpec("ja", alpha=0.0))
    with intervene(handle, neurons, noop) as active:
        assert torch.equal(logits(handle, batch), before)
        assert active.summary().steer is None
    steer = Intervention(PatchSpec("ja", op="mul", value=1.0), SteerSpec("ja", alpha=1.0, layers=(2,)))
    with intervene(handle, neurons, steer) as active:
        assert not torch.equal(logits(handle, batch), before)
        assert active.summary().patch == "ja:lape:mul=1+diffmean*1(resid_norm)@L2"
    assert torch.equal(logits(handle, batch), before)


def test_the_vector_is_added_at_every_position_of_the_chosen_layer_only(handle, neurons):
    batch = encode(handle, ["The weather today is", "Le temps"])
    spec = SteerSpec("fr", alpha=0.5, layers=(1,))
    vector = steering_vectors(neurons, spec, neurons.n_layers)[1]

    def capture():
        seen = {}
        hooks = [handle.adapter.site("resid_post")[layer].register_forward_hook(  # after any steer hook
            lambda m, a, out, layer=layer: seen.update({layer: (out[0] if isinstance(out, tuple) else out).clone()}))
            for layer in range(handle.adapter.n_layers)]
        try:
            logits(handle, batch)
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    plain = capture()
    with intervene(handle, neurons, Intervention(PatchSpec("fr", op="mul", value=1.0), spec)):
        steered = capture()
    torch.testing.assert_close(steered[0], plain[0], rtol=0, atol=0)  # layers before it: untouched
    torch.testing.assert_close(steered[1], plain[1] + vector, rtol=0, atol=0)  # every row and position
    assert not torch.allclose(steered[2], plain[2])  # later layers read the steered stream


def test_vector_and_neuron_patch_compose_and_restore_bit_for_bit(handle, neurons):
    batch = encode(handle, ["Ibu kota Indonesia adalah", "Tokyo is"])
    state = {k: v.clone() for k, v in handle.model.state_dict().items()}
    before = logits(handle, batch)
    patch = PatchSpec("ja", neuron_set="baseline", op="mul", value=3.0)
    both = Intervention(patch, SteerSpec("ja", alpha=0.5, layers=(1, 2)))
    with intervene(handle, neurons, patch):
        patched_only = logits(handle, batch)
    with intervene(handle, neurons, both) as active:
        combined = logits(handle, batch)
        assert active.summary().neurons > 0 and active.summary().steer == "diffmean*0.5(resid_norm)@L1,2"
    assert not torch.equal(combined, patched_only) and not torch.equal(combined, before)
    assert torch.equal(logits(handle, batch), before)
    after = handle.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(not m._forward_hooks for m in handle.adapter.site("resid_post"))


def test_bad_steer_settings_are_one_line_errors(neurons):
    with pytest.raises(UserError, match="steer.scale=cube is not allowed"):
        SteerSpec("ja", alpha=1.0, scale="cube")
    with pytest.raises(UserError, match="steer.alpha='x' is not a number"):
        SteerSpec.from_config({"alpha": "x"}, "ja")
    old = neuronset.NeuronSet(neurons.languages, neurons.masks, neurons.p_max, neurons.p_median,
                                  neurons.activation_prob)
    with pytest.raises(UserError, match="holds no residual means"):
        old.diffmean("ja")


def _loud_model(dtype):
    """A tiny model whose residual stream is large (embeddings x 1000), with residual means to steer by."""
    from dataclasses import replace

    from conftest import synthetic_neurons

    loud = load_tiny("llama")
    with torch.no_grad():
        loud.model.model.embed_tokens.weight.mul_(1000)
    loud.model.to(dtype)
    shape = (len(LANGS), loud.adapter.n_layers)
    means = torch.randn(*shape, loud.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return loud, replace(synthetic_neurons(loud, LANGS), resid_mean=means, resid_norm=torch.ones(shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_small_vector_lost_in_bf16_is_measured_per_layer_and_warned_once(dtype, caplog):
    """||(h + αv) − h|| / ||αv|| as applied: in bf16 a small vector on a large residual mostly rounds away (one
    warning per steer context, naming the layer and the fix); in fp32 it arrives whole and nothing is logged."""
    import logging

    loud, means = _loud_model(dtype)
    batch = encode(loud, ["The weather today is", "Le temps"])
    spec = Intervention(PatchSpec("fr", op="mul", value=1.0), SteerSpec("fr", alpha=0.1, scale="unit"))
    with caplog.at_level(logging.WARNING, logger="lsn_exp.steer"):
        with intervene(loud, means, spec) as active:
            logits(loud, batch)
            logits(loud, batch)
            ratios = active.summary().steer_norm_ratio
    assert sorted(ratios) == [str(layer) for layer in range(loud.adapter.n_layers)]
    warned = [r.getMessage() for r in caplog.records if "steer" in r.getMessage()]
    if dtype == torch.float32:
        assert all(abs(r - 1) < 1e-3 for r in ratios.values()), ratios
        assert warned == []
        return
    worst = min(ratios, key=ratios.get)
    assert ratios[worst] < 0.9, ratios
    assert len(warned) == 1 and f"layer {worst}" in warned[0] and f"{ratios[worst]:.2f}" in warned[0]
    assert "float32" in warned[0] and "device" in warned[0]


# --- prompt baselines ---------------------------------------------------------------------------------------

def test_prompt_baselines_build_the_documented_prefixes(data_root):
    from lsn_exp import data

    assert data.prompt_prefix("none", "id", data_root) == ""
    assert data.prompt_prefix("instruction", "id", data_root) == "Answer in Indonesian.\n"
    dev = data.flores(data_root, data.languages(["ja"])[0], "dev").sentences
    assert data.prompt_prefix("priming", "ja", data_root, sentence=3) == dev[3] + "\n"
    with pytest.raises(UserError, match="prompt.mode=shout is not allowed"):
        data.prompt_prefix("shout", "ja", data_root)
    plain, primed = (data.lss_docs(data_root, "en", 3, 0, prompt_prefix=p) for p in ("", "Hallo.\n"))
    assert [d["prompt"] for d in primed] == ["Hallo.\n" + d["prompt"] for d in plain]
    assert [d["choices"] for d in primed] == [d["choices"] for d in plain]


def test_a_prompt_baseline_scores_prefixed_prompts_against_the_plain_unpatched_ones(handle, neurons, data_root):
    import numpy as np

    from lsn_exp import data, lmeval, lss

    evaluator = lss.LssEvaluator(handle, lss_settings({"n_facts": 4, "sources": ["en", "fr"]}), data_root, None)
    prefix = data.prompt_prefix("priming", "ja", data_root)
    spec = Intervention(PatchSpec("ja", op="mul", value=1.0), prompt="priming", prefix=prefix)
    shifts, summary, _, _ = evaluator.deltas(neurons, spec)
    assert summary.patch == "ja:lape:mul=1+prompt:priming"
    keep, plain, primed = evaluator._requests_toward("ja", prefix)
    assert all(p.args[0] == prefix + q.args[0] and p.args[1] == q.args[1] for p, q in zip(primed, plain))
    before = np.asarray(lmeval.loglikelihoods(evaluator.lm, plain)).reshape(-1, 2)
    after = np.asarray(lmeval.loglikelihoods(evaluator.lm, primed)).reshape(-1, 2)
    want = (after[:, 1] - after[:, 0]) - (before[:, 1] - before[:, 0])
    got = np.concatenate([shifts[s][idx] for s, idx in keep.items()])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got).max() > 1e-3  # the prefix does move the scores


def test_generation_under_a_prompt_baseline_continues_the_prefixed_prompt(handle, data_root):
    from lsn_exp import generate
    from lsn_exp.settings import generate_settings

    settings = generate_settings({"sources": ["en"], "n_prompts": 2, "max_new_tokens": 4})
    prompts = generate.prompt_sets(settings, data_root)
    summary, rows = generate.steering(handle, prompts, "fr", settings, None, prefix="Bonjour.\n")
    from lsn_exp.engine import HFEngine

    want = HFEngine(handle).generate(["Bonjour.\n" + p for p in prompts["en"]], 4).texts
    plain = HFEngine(handle).generate(prompts["en"], 4).texts
    assert [r[5] for r in rows] == want and [r[2] for r in rows] == plain
    assert [r[1] for r in rows] == prompts["en"]  # the CSV keeps the plain prompt


SMALL_COMPARE = ("model=tiny", "compare.targets=[fr,ja]", "compare.lss_n_facts=3", "compare.n_prompts=2",
                 "compare.xcopa_limit=0", "compare.search.n_evals=2", "compare.search.n_prompts=1",
                 "compare.final.n_prompts=1", "generate.max_new_tokens=4", "identify.languages=[en,fr,ja]",
                 "identify.max_tokens=300", "lss.sources=[en,fr,ja]", "logger=none")


@pytest.mark.slow  # a sweep of real jobs (about a minute): in `make test-slow`
def test_compare_methods_writes_one_row_per_method_and_target_and_method_best_runs_the_winner(tmp_path):
    import csv
    import json

    from conftest import run_cli

    result = run_cli("+experiment=compare_methods", "compare=full", *SMALL_COMPARE, f"hydra.run.dir={tmp_path}",
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    methods = ["unpatched", "lape_pmax", "lape_mul", "lape_pmax_no_en", "diffmean", "lape_pmax_diffmean",
               "prompt_priming"]  # compare=full
    assert [(r["method"], r["target"], r["domain"]) for r in rows] == [
        (m, t, d) for m in methods for t in ("fr", "ja") for d in ("news", "everyday")]
    by = {(r["method"], r["target"]): r for r in rows if r["domain"] == "news"}
    assert by[("prompt_priming", "fr")]["intervention"] == "fr:lape:mul=1+prompt:priming"
    assert by[("lape_pmax_no_en", "fr")]["intervention"] == "fr:lape:set=pmax:others(en):set=0"
    alpha = float(by[("diffmean", "ja")]["coefficient"])  # searched on [0.002, 0.1] (log), reported at the winner
    assert 0.002 <= alpha <= 0.1 and by[("diffmean", "ja")]["intervention"] == f"ja:lape:mul=1+diffmean*{alpha:g}(resid_norm)"
    assert by[("lape_pmax", "fr")]["coefficient"] == "" and by[("lape_pmax", "fr")]["search_score"] != ""
    assert all(0 <= float(r["steering_success"]) <= float(r["target_share"]) <= 1 for r in rows)
    partial = list(csv.DictReader(open(tmp_path / "compare_partial.csv")))  # rewritten after each target
    assert sorted((r["method"], r["target"], r["domain"]) for r in partial) == sorted(
        (r["method"], r["target"], r["domain"]) for r in rows)
    tests = list(csv.DictReader(open(tmp_path / "compare_tests.csv")))  # 7 methods: 21 pairs per target and domain
    assert len(tests) == 21 * 2 * 2 and all(0 <= float(t["p"]) <= float(t["q"]) <= 1 for t in tests)
    curve = list(csv.DictReader(open(tmp_path / "compare_search.csv")))
    searched = [r for r in curve if r["method"] == "diffmean" and r["target"] == "ja"]
    assert len(searched) == 2 and alpha in [float(r["coefficient"]) for r in searched]  # n_evals points, winner among
    assert len([r for r in curve if r["method"] == "lape_pmax"]) == 2  # a fixed method: one point per target
    for name in ("compare_scatter.png", "compare_search.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| method |" in (tmp_path / "compare.md").read_text()
    decoded = json.loads((tmp_path / "results.json").read_text())["results"]["compare"]["generation_config"]
    assert decoded["do_sample"] is False and decoded["max_new_tokens"] == 4

    best = run_cli("method=best", "compare=full", "lang=ja", "stage=generate", *SMALL_COMPARE, f"hydra.run.dir={tmp_path}/best",
                   timeout=600)
    assert best.returncode == 0, best.stderr[-3000:]
    winner = max((r for r in rows if r["target"] == "ja" and r["method"] != "unpatched" and r["domain"] == "news"),
                 key=lambda r: float(r["final_score"]))  # the best on the final prompts, not on the search
    assert f"method=best toward ja: {winner['method']}" in best.stdout + best.stderr
    stale = run_cli("method=best", "lang=ja", "stage=generate", *SMALL_COMPARE,  # the default methods: no winner
                    f"hydra.run.dir={tmp_path}/stale", timeout=600)
    assert stale.returncode != 0 and "method=best: no compare run matches" in stale.stdout + stale.stderr
