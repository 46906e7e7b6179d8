"""Steering success and fluency: repetition in every script, unpatched-model NLL, prompts from config."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_tiny

from lsn_exp import REPO_ROOT, data, engine, generate
from lsn_exp.engine import HFEngine
from lsn_exp.errors import UserError
from lsn_exp.settings import generate_settings


@pytest.mark.parametrize("text, degenerate", [
    ("alıkalıkalıkalıkalıkalıkalıkalık", True),  # one "word" to a whitespace split
    ("、、、、、、、、、、、、、、", True),
    ("แรกแรกแรกแรกแรกแรกแรกแรก", True),
    ("the the the the the the the the", True),
    ("Saya pergi ke pasar kemarin untuk membeli sayur dan buah.", False),
    ("今日は天気が良いので、公園まで散歩に行きました。", False),
])
def test_repetition_rate_flags_babbling_in_every_script(text, degenerate):
    rate = generate.repetition_rate(text, 4)
    assert 0 <= rate <= 1
    assert (rate > 0.5) == degenerate, rate


def test_repetition_rate_by_hand():
    assert generate.repetition_rate("abcabc", 3) == 1 - 3 / 4  # abc bca cab abc: 3 distinct of 4
    assert generate.repetition_rate("ab", 4) == 0.0 and generate.repetition_rate("", 4) == 0.0


def test_steering_success_counts_only_fluent_target_continuations():
    gens = [generate.Generation("p", "Saya pergi ke pasar", "id", 0.1),
            generate.Generation("p", "alıkalıkalık", "id", 0.9),
            generate.Generation("p", "I went to", "en", 0.0),
            generate.Generation("p", "Aku suka", "id", 0.5)]
    assert generate.share_in(gens, "id") == 0.75
    assert generate.share_in(gens, "id", max_repetition=0.5) == 0.5  # 0.9 is degenerate, 0.5 is not
    summary = generate.fluency_summary(gens, 0.5)
    assert summary["degenerate_share"] == 0.25 and summary["ppl"] is None


def continuations(handle, prompts, max_new_tokens):
    """The engine's greedy continuations as (texts, sequences [B, T], mask, width): the left-padded prompts, then
    the new tokens (each row's first stop id and everything after it masked out)."""
    hf = HFEngine(handle)
    generated = hf.generate(prompts, max_new_tokens)
    batch, (new, kept) = hf.left_padded(prompts), generated.tokens
    return (generated.texts, torch.cat([batch["input_ids"], new], dim=1),
            torch.cat([batch["attention_mask"], kept], dim=1), batch["input_ids"].shape[1])


def continuation_nll(handle, prompts, max_new_tokens):
    """The engine's mean NLL per token of each greedy continuation of ``prompts``, after the same prompts."""
    hf = HFEngine(handle)
    return hf.continuation_nll(prompts, hf.generate(prompts, max_new_tokens))


def test_continuation_nll_is_the_unpatched_models_mean_token_nll():
    handle = load_tiny("llama")
    prompts = ["The weather today is", "Yesterday I"]
    texts, sequences, mask, width = continuations(handle, prompts, 6)
    got = continuation_nll(handle, prompts, 6)
    for row, prompt in enumerate(prompts):
        prompt_ids = handle.tokenizer(prompt)["input_ids"]
        new = [t for t, m in zip(sequences[row, width:].tolist(), mask[row, width:].tolist()) if m]
        with torch.no_grad():
            logits = handle.model(torch.tensor([prompt_ids + new])).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        want = -sum(lp[len(prompt_ids) - 1 + i, tok] for i, tok in enumerate(new)) / len(new)
        assert math.isclose(got[row], float(want), rel_tol=1e-4, abs_tol=1e-4)


def test_prompts_come_from_flores_devtest_or_a_file(data_root):
    settings = generate_settings({"sources": ["en", "ja"], "n_prompts": 3, "prompt_words": 4})
    prompts = generate.prompt_sets(settings, data_root)
    devtest = {c: data.flores(data_root, data.languages([c])[0], "devtest").sentences for c in ("en", "ja")}
    assert prompts["en"] == [" ".join(s.split()[:4]) for s in devtest["en"][:3]]
    assert prompts["ja"] == [s[:12] for s in devtest["ja"][:3]]
    from_file = generate_settings({"prompts_file": str(REPO_ROOT / "scripts" / "neutral_prompts.yaml")})
    assert generate.prompt_sets(from_file, data_root)["en"][0] == "The weather today is"
    with pytest.raises(UserError, match="generate.prompts_file=nope.yaml is not a file"):
        generate_settings({"prompts_file": "nope.yaml"})
    written = generate_settings({"prompts": {"en": ["Once upon a time"], "fr": ["Il était une fois"]}})
    assert generate.prompt_sets(written, data_root) == {"en": ["Once upon a time"], "fr": ["Il était une fois"]}
    assert generate.prompt_sets(generate_settings({"prompts": ["Hello there"]}), data_root) == {"en": ["Hello there"]}
    with pytest.raises(UserError, match="generate.prompts must be"):
        generate_settings({"prompts": {"en": "not a list"}})
    with pytest.raises(UserError, match="both set"):
        generate_settings({"prompts": ["x"], "prompts_file": str(REPO_ROOT / "scripts" / "neutral_prompts.yaml")})


def test_the_generate_stage_reports_per_source_success_and_fluency(tmp_path):
    import json

    from conftest import run_cli

    result = run_cli("model=tiny", "stage=generate", "lang=fr", "identify.languages=[en,fr,ja]",
                     "identify.max_tokens=300", "generate.n_prompts=3", "generate.max_new_tokens=5", "logger=none",
                     f"hydra.run.dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads((tmp_path / "results.json").read_text())["results"]["generate"]
    assert set(found["by_source"]) == {"en", "fr", "ja", "all"}
    for source in ("en", "fr", "ja"):
        for run in ("unpatched", "patched"):
            cell = found["by_source"][source][run]
            assert cell["n"] == 3 and cell["steering_success"] <= cell["target_share"] and cell["ppl"] > 1
    overall = found["by_source"]["all"]["patched"]  # the fr prompts (already the target) are left out of "all"
    assert overall["n"] == 6 and found["n_prompts"] == 6
    by = found["by_source"]
    assert overall["target_share"] == pytest.approx((by["en"]["patched"]["target_share"]
                                                     + by["ja"]["patched"]["target_share"]) / 2)
    decoded = found["generation_config"]  # every decoding setting, none from the model's generation config
    assert decoded["do_sample"] is False and decoded["repetition_penalty"] == 1.0 and decoded["max_new_tokens"] == 5
    assert decoded["eos_token_id"] == [1] and decoded["no_repeat_ngram_size"] == 0
    rows = (tmp_path / "generations.csv").read_text().splitlines()
    assert len(rows) == 1 + 9 and rows[0].startswith("source,prompt,unpatched")


def test_continuation_nll_in_chunks_equals_one_forward(monkeypatch):
    handle = load_tiny("llama")
    prompts = ["The weather today is", "Yesterday I", "Bonjour", "Il était une fois", "Once"]
    whole = continuation_nll(handle, prompts, 5)
    monkeypatch.setattr(engine, "NLL_ROWS", 2)
    chunked = continuation_nll(handle, prompts, 5)
    assert len(chunked) == 5 and all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(whole, chunked))


def test_by_source_splits_one_batch_back_in_order():
    prompts = {"en": ["a", "b"], "fr": ["c"], "ja": ["d", "e", "f"]}
    assert generate.joined(prompts) == list("abcdef")
    assert generate.by_source(prompts, list("ABCDEF")) == {"en": ["A", "B"], "fr": ["C"], "ja": ["D", "E", "F"]}


def test_unpatched_continuations_are_cached_once_per_model_prompts_and_settings(tmp_path):
    from lsn_exp.cache import CacheStore

    handle, store = load_tiny("llama"), CacheStore(tmp_path)
    prompts = {"en": ["The weather today is", "Yesterday I"], "fr": ["Il était une fois"]}
    settings = generate_settings({"max_new_tokens": 5})
    fresh = generate.fill_unpatched(handle, prompts, settings, {}, store)
    again = generate.fill_unpatched(handle, prompts, settings, {}, store)
    assert again == fresh == generate.fill_unpatched(handle, prompts, settings, {})  # the same as no cache
    assert [e["kind"] for e in store.ledger()] == ["generate_unpatched"]  # generated once
    generate.fill_unpatched(handle, prompts, generate_settings({"max_new_tokens": 4}), {}, store)
    generate.fill_unpatched(handle, {"en": prompts["en"]}, settings, {}, store)
    assert len(store.ledger()) == 3  # other settings, other prompt set: generated anew


# --- decoding: every stop id, plain greedy, prefixed prompts scored on the plain prompt -------------------------

def argmax_tokens(handle, prompt_ids: list[int], n: int, stop: set[int]) -> list[int]:
    """Greedy by hand, one token at a time: the argmax of the last logits, no penalty of any kind."""
    ids, new = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(n):
            token = int(handle.model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
            new.append(token)
    return new


def nll_after(handle, prompt_ids: list[int], new: list[int]) -> float:
    """Mean NLL of ``new`` after ``prompt_ids``, one unpadded forward in float64."""
    with torch.no_grad():
        logits = handle.model(torch.tensor([prompt_ids + new])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return float(-sum(lp[len(prompt_ids) - 1 + i, tok] for i, tok in enumerate(new)) / len(new))


def kept(sequences, mask, width, row) -> list[int]:
    return [t for t, m in zip(sequences[row, width:].tolist(), mask[row, width:].tolist()) if m]


def test_every_id_the_model_stops_on_ends_the_continuation():
    handle = load_tiny("llama")
    prompts = ["The weather today is", "Yesterday I"]
    _, sequences, _, width = continuations(handle, prompts, 8)
    row = sequences[0, width:].tolist()
    k = next(i for i in range(2, 8) if row[i] not in row[:i])  # a token it emits first at step k
    stop = row[k]
    short_texts, *_ = continuations(handle, prompts[:1], k)
    truncated_nll = continuation_nll(handle, prompts[:1], k)[0]
    handle.model.generation_config.eos_token_id = [handle.tokenizer.eos_token_id, stop]  # as Gemma-2-it's [1, 107]
    texts, sequences, mask, width = continuations(handle, prompts, 8)
    assert sequences[0, width + k] == stop and kept(sequences, mask, width, 0) == row[:k]
    assert mask[0, width + k:].sum() == 0  # the stop token and the padding after it
    assert texts[0] == short_texts[0]
    nll = continuation_nll(handle, prompts, 8)[0]
    assert math.isclose(nll, truncated_nll, rel_tol=1e-5, abs_tol=1e-5)


def penalised_tiny():
    """A tiny model whose own generation config asks for penalties (as Qwen2.5-Instruct's repetition_penalty) and
    suppresses the token greedy decoding picks first after "The weather today is"."""
    handle = load_tiny("llama")
    first = argmax_tokens(handle, handle.tokenizer("The weather today is")["input_ids"], 1, set())
    handle.model.generation_config.repetition_penalty = 1.3
    handle.model.generation_config.no_repeat_ngram_size = 2
    handle.model.generation_config.suppress_tokens = first
    return handle


def test_continuations_are_plain_argmax_whatever_the_models_generation_config():
    handle = penalised_tiny()
    prompts = ["The weather today is", "Yesterday I"]
    _, sequences, mask, width = continuations(handle, prompts, 12)
    stop = {handle.tokenizer.eos_token_id}
    for row, prompt in enumerate(prompts):
        want = argmax_tokens(handle, handle.tokenizer(prompt)["input_ids"], 12, stop)
        assert kept(sequences, mask, width, row) == want
    config = HFEngine(handle).generation_config(12)
    assert config["repetition_penalty"] == 1.0 and config["no_repeat_ngram_size"] == 0
    assert config["do_sample"] is False and config["max_new_tokens"] == 12 and config["eos_token_id"] == [1]


def test_lm_evals_generate_until_is_plain_argmax_whatever_the_models_generation_config():
    from lm_eval.api.instance import Instance

    from lsn_exp import lmeval

    handle = penalised_tiny()
    lm = lmeval.hflm(handle)
    prompts = ["The weather today is", "Yesterday I"]
    requests = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 12, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    got = lm.generate_until(requests, disable_tqdm=True)
    for prompt, text in zip(prompts, got):
        context = lm.tok_batch_encode([prompt])[0][0].tolist()
        assert text == lm.tok_decode(argmax_tokens(handle, context, 12, {handle.tokenizer.eos_token_id}))


def test_a_prompt_baselines_continuation_is_scored_after_the_plain_prompt():
    handle = load_tiny("llama")
    prompts, prefix = ["The weather today is", "Yesterday I"], "Bonjour à tous. Il fait beau. "
    _, rows = generate.steering(handle, {"en": prompts}, "fr", generate_settings({"max_new_tokens": 6}),
                                prefix=prefix)
    texts, sequences, mask, width = continuations(handle, [prefix + p for p in prompts], 6)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        new = kept(sequences, mask, width, i)
        plain = nll_after(handle, handle.tokenizer(prompt)["input_ids"], new)
        prefixed = nll_after(handle, handle.tokenizer(prefix + prompt)["input_ids"], new)
        assert row[1] == prompt and row[5] == texts[i]
        assert math.isclose(row[8], plain, abs_tol=1e-4) and abs(plain - prefixed) > 1e-2


def test_lm_evals_generate_until_ends_at_every_id_the_model_stops_on():
    from lm_eval.api.instance import Instance

    from lsn_exp import lmeval

    handle = load_tiny("llama")
    lm = lmeval.hflm(handle)
    context = lm.tok_batch_encode(["The weather today is"])[0][0].tolist()
    row = argmax_tokens(handle, context, 8, set())
    k = next(i for i in range(2, 8) if row[i] not in row[:i])
    handle.model.generation_config.eos_token_id = [handle.tokenizer.eos_token_id, row[k]]
    request = Instance("generate_until", {}, ("The weather today is", {"until": [], "max_gen_toks": 8}), 0)
    assert lm.generate_until([request], disable_tqdm=True) == [lm.tok_decode(row[:k])]
