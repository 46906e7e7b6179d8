"""LAPE, baseline and random sets, worked out by hand; the cached stage entry."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lsn_exp import identify
from lsn_exp.cache import CacheStore
from lsn_exp.record import Recording
from lsn_exp.settings import eval_settings, identify_settings, lss_settings


def hand_recording() -> Recording:
    """3 languages, 1 layer, 4 neurons; 20 tokens each, so p = counts / 20.

    n0 [0.90 0.00 0.00]  only lang 0         entropy 0
    n1 [0.80 0.80 0.00]  shared by langs 0,1  entropy ln 2
    n2 [0.10 0.10 0.10]  below tau            entropy inf
    n3 [0.30 0.00 0.05]  not above tau        entropy inf
    Sorted p (12): 0 0 0 0 .05 .1 .1 .1 .3 .8 .8 .9
    """
    counts = torch.tensor([[18, 16, 2, 6], [0, 16, 2, 0], [0, 0, 2, 1]], dtype=torch.int64)[:, None, :]
    k, l, d = counts.shape
    return Recording(languages=["a", "b", "c"], counts=counts, tokens=torch.tensor([20, 20, 20]),
                     sentences=torch.tensor([5, 5, 5]), p_max=torch.ones(k, l, d), p_median=torch.ones(k, l, d),
                     always_active=torch.zeros(k, l, d, dtype=torch.bool))


def test_lape_by_hand_with_a_shared_neuron_and_a_dropped_candidate():
    # filter = bar = rank round(0.75*12)=9 -> 0.3. Candidates: round(0.75*4)=3 lowest entropy: n0, n1, one inf.
    art = identify.identify(hand_recording(), top_rate=0.75, filter_rate=0.75, bar_rate=0.75, seed=0)
    lape = art.masks["lape"][:, 0, :]
    assert lape.tolist() == [[True, True, False, False], [False, True, False, False], [False] * 4]
    assert art.meta["thresholds"]["tau_filter"] == pytest.approx(0.3)
    assert art.meta["thresholds"]["n_candidates"] == 3
    assert art.meta["thresholds"]["n_dropped_candidates"] == 1  # the infinite-entropy candidate


def test_lape_bar_above_the_filter_drops_the_shared_neuron():
    # bar: rank round(0.8*12)=10 -> 0.8; n1 has p = 0.8, not > 0.8, so it is a candidate above no bar.
    art = identify.identify(hand_recording(), top_rate=0.75, filter_rate=0.75, bar_rate=0.8, seed=0)
    assert art.masks["lape"][:, 0, :].tolist() == [[True, False, False, False], [False] * 4, [False] * 4]
    assert art.meta["thresholds"]["n_dropped_candidates"] == 2


def test_entropy_convention_zero_log_zero_and_all_zero_neurons():
    prob = torch.tensor([[[0.0, 0.5]], [[0.0, 0.5]]])  # n0 never active anywhere, n1 even split
    masks, th = identify.lape_masks(prob, top_rate=1.0, filter_rate=0.5, bar_rate=0.5)
    # tau = 2nd of [0, 0, .5, .5] = 0; n0 has no p above tau -> inf entropy -> dropped; n1 -> both languages
    assert masks[:, 0, :].tolist() == [[False, True], [False, True]]
    assert th["n_dropped_candidates"] == 1


def test_random_set_matches_lape_counts_per_layer_and_is_seeded():
    lape = torch.zeros(2, 3, 50, dtype=torch.bool)
    lape[0, 0, :4] = True
    lape[1, 2, 10:17] = True
    a, b, c = (identify.random_masks(lape, s) for s in (7, 7, 8))
    assert torch.equal(a.sum(dim=2), lape.sum(dim=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_baseline_is_always_active_and_jaccard_is_symmetric():
    rec = hand_recording()
    rec.always_active[0, 0, :2] = True
    rec.always_active[1, 0, 1:3] = True
    art = identify.identify(rec, 0.75, 0.75, 0.75, seed=0)
    assert torch.equal(art.masks["baseline"], rec.always_active)
    overlap = identify.jaccard(art.masks["baseline"])
    assert overlap[0, 1].item() == pytest.approx(1 / 3) and overlap[1, 0].item() == pytest.approx(1 / 3)
    assert overlap[2, 2].item() == 0.0  # an empty set overlaps nothing
    assert [t.tolist() for t in art.neurons("lape", "a")] == [[0, 1]]


def _identify_cfg(**overrides):
    base = {"languages": ["en", "fr", "ja"], "split": "dev", "max_tokens": 600, "n_stat_sentences": 10,
            "prefix": "auto", "top_rate": 0.05, "filter_rate": 0.95, "bar_rate": 0.95, "batch_size": 8}
    return identify_settings({**base, **overrides})


def test_artifact_cache_reuses_recomputes_on_key_change_and_recovers_from_damage(tiny, data_root, tmp_path):
    store = CacheStore(tmp_path)
    first = identify.build(_identify_cfg(), tiny, data_root, store, seed=0)
    again = identify.build(_identify_cfg(), tiny, data_root, store, seed=0)
    assert first.recorded and not again.recorded
    assert torch.equal(first.neurons.masks["lape"], again.neurons.masks["lape"])
    assert torch.equal(first.neurons.p_max, again.neurons.p_max)
    assert identify.build(_identify_cfg(max_tokens=500), tiny, data_root, store, seed=0).recorded
    reselected = identify.build(_identify_cfg(top_rate=0.02), tiny, data_root, store, seed=0)
    assert not reselected.recorded and reselected.key != first.key


def test_artifact_key_is_builds_key_computed_without_recording(tiny, data_root, tmp_path):
    """factor=best / method=best look their search up by this key before a job records (lsn_exp.job)."""
    store = CacheStore(tmp_path)
    for cfg, seed in ((_identify_cfg(), 0), (_identify_cfg(languages=["en", "fr"], top_rate=0.02), 3)):
        key = identify.neurons_key(cfg, tiny, data_root, seed)
        assert not any(tmp_path.iterdir())
        assert identify.build(cfg, tiny, data_root, store, seed=seed).key == key
        for entry in list(tmp_path.iterdir()):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def test_cache_keys_hold_dtype_device_and_code_versions(tiny, data_root, tmp_path, monkeypatch):
    """An fp32 CPU recording is never reused by a bf16 job, and a change of recording or selection code
    (its version constant) records or selects again."""
    from conftest import load_tiny

    from lsn_exp import record

    store = CacheStore(tmp_path)
    cfg = _identify_cfg(languages=["en", "fr"], max_tokens=300)
    fp32 = identify.build(cfg, tiny, data_root, store, seed=0)
    bf16_handle = load_tiny("llama")
    bf16_handle.model.to(torch.bfloat16)
    bf16 = identify.build(cfg, bf16_handle, data_root, store, seed=0)
    assert bf16.recorded and bf16.key != fp32.key
    specs = [json.loads(p.read_text())["spec"] for p in (tmp_path / "recording").glob("*/meta.json")]
    assert sorted(s["dtype"] for s in specs) == ["bfloat16", "bfloat16", "float32", "float32"]
    assert {s["device"] for s in specs} == {"cpu"} and {s["record_version"] for s in specs} == {record.RECORD_VERSION}
    assert not identify.build(cfg, tiny, data_root, store, seed=0).recorded
    monkeypatch.setattr(record, "RECORD_VERSION", record.RECORD_VERSION + 1)
    assert identify.build(cfg, tiny, data_root, store, seed=0).recorded
    monkeypatch.setattr(identify, "IDENTIFY_VERSION", identify.IDENTIFY_VERSION + 1)
    reselected = identify.build(cfg, tiny, data_root, store, seed=0)
    assert not reselected.recorded and reselected.key not in (fp32.key, bf16.key)


def test_lss_and_downstream_unpatched_keys_hold_dtype_device_and_version(tiny, data_root):
    from lsn_exp import downstream, lss

    evaluator = lss.LssEvaluator(tiny, lss_settings({"n_facts": 2, "sources": ["en"]}), data_root, None)
    spec = evaluator.unpatched.spec("en", "fr")
    assert (spec["dtype"], spec["device"], spec["lss_version"]) == ("torch.float32", "cpu", lss.LSS_VERSION)
    xcopa = eval_settings({"tasks": ["xcopa"], "langs": ["id"], "limit": 2})
    task_eval = downstream.DownstreamEvaluator(tiny, xcopa, data_root,
                                               None)
    spec = downstream.unpatched_spec(tiny, task_eval.refs[0], task_eval.root, task_eval.settings)
    assert (spec["dtype"], spec["device"], spec["version"]) == ("torch.float32", "cpu", downstream.DOWNSTREAM_VERSION)


def test_recordings_are_cached_per_language_and_damage_is_recomputed(tiny, data_root, tmp_path):
    store = CacheStore(tmp_path)
    identify.build(_identify_cfg(languages=["en", "fr"]), tiny, data_root, store, seed=0)
    assert len(list((tmp_path / "recording").glob("*/meta.json"))) == 2
    grown = identify.build(_identify_cfg(), tiny, data_root, store, seed=0)  # + ja: records only ja
    assert grown.recorded and len(list((tmp_path / "recording").glob("*/meta.json"))) == 3
    for entry in (tmp_path / "recording").glob("*/tensors.safetensors"):
        entry.write_bytes(b"garbage")
        break
    again = identify.build(_identify_cfg(), tiny, data_root, store, seed=0)
    assert again.recorded  # the damaged language was detected and recorded again
    assert torch.equal(again.neurons.masks["lape"], grown.neurons.masks["lape"])
    assert not identify.build(_identify_cfg(), tiny, data_root, store, seed=0).recorded


def test_sentence_statistics_span_real_sentences(tiny, data_root, tmp_path):
    result = identify.build(_identify_cfg(), tiny, data_root, CacheStore(tmp_path), seed=0)
    art = result.neurons
    assert art.languages == ["en", "fr", "ja"]
    assert (art.p_max >= art.p_median).all()
    assert all(0 < t <= 600 for t in art.meta["tokens"])
    assert math.isfinite(art.meta["thresholds"]["tau_filter"])


def test_one_bar_shows_the_whole_recording_and_nothing_when_it_is_cached(tiny, data_root, tmp_path, capsys):
    store = CacheStore(tmp_path)
    identify.build(_identify_cfg(max_tokens=300), tiny, data_root, store, seed=0)
    shown = capsys.readouterr().err
    final = [part for part in shown.replace("\r", "\n").splitlines() if part.startswith("record:")][-1]
    assert "3.0/3 languages" in final and "ja, " in final and " tokens" in final, final
    assert "batch" not in shown  # no per-language bars beside it
    identify.build(_identify_cfg(max_tokens=300), tiny, data_root, store, seed=0)
    assert "record:" not in capsys.readouterr().err
