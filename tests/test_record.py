"""Recording: counts and means equal a brute-force capture; padding and batch size never leak in."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from lsn_exp.record import prefix_token, record_language, select_under_cap, tokenize
from conftest import load_tiny


def bos(handle):
    return prefix_token(handle.tokenizer, "auto")


def brute_force(handle, sentences):
    """Run every sentence alone after its prefix token, capture every act_fn output, count and average over
    the sentence's own tokens (position 0, the prefix, left out)."""
    ids = tokenize(handle.tokenizer, sentences, bos(handle))
    layers = handle.adapter.n_layers
    counts = torch.zeros(layers, handle.adapter.d_ff, dtype=torch.int64)
    min_abs = torch.full((layers, handle.adapter.d_ff), float("inf"))  # closest any activation gets to 0
    means, acts = [], {}
    hooks = [a.register_forward_hook(lambda m, i, o, l=l: acts.__setitem__(l, o[0, 1:]))
             for l, a in enumerate(handle.adapter.site("mlp.gate"))]
    try:
        with torch.no_grad():
            for row in ids:
                handle.model(torch.tensor([row]))
                stacked = torch.stack([acts[l] for l in range(layers)]).double()  # [L, T_real, d]
                counts += (stacked > 0).sum(dim=1)
                min_abs = torch.minimum(min_abs, stacked.abs().amin(dim=1))
                means.append(stacked.mean(dim=1).float())
    finally:
        for h in hooks:
            h.remove()
    return counts, sum(len(r) - 1 for r in ids), torch.stack(means), min_abs


def test_counts_and_means_equal_a_brute_force_capture(tiny, flores_dev):
    sentences = flores_dev["fr"][:12]
    counts, n_tokens, n_sent, means, *_ = record_language(tiny, sentences, 10_000, 12, bos(tiny), batch_size=5)
    ref_counts, ref_tokens, ref_means, min_abs = brute_force(tiny, sentences)
    assert n_tokens == ref_tokens and n_sent == 12
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=1e-4)
    assert (min_abs[counts != ref_counts] < 1e-5).all(), "a count differs away from a near-zero activation"


def test_batch_size_and_padding_never_change_counts_or_means(tiny, flores_dev):
    sentences = flores_dev["ja"][:16] + flores_dev["en"][:8]  # very different lengths -> heavy padding
    one = record_language(tiny, sentences, 10_000, 10, bos(tiny), batch_size=1)
    eight = record_language(tiny, sentences, 10_000, 10, bos(tiny), batch_size=8)
    assert one[1:3] == eight[1:3]
    torch.testing.assert_close(one[3], eight[3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one.resid_mean, eight.resid_mean, atol=1e-5, rtol=1e-4)  # DiffMean's input
    torch.testing.assert_close(one.resid_norm, eight.resid_norm, atol=1e-4, rtol=1e-5)
    differing = one[0] != eight[0]
    # Only a sign flip of an activation within ~1e-5 of zero may move a count.
    _, _, _, min_abs = brute_force(tiny, sentences)
    assert (min_abs[differing] < 1e-5).all()
    assert (one[0] - eight[0]).abs().sum() <= differing.sum() * 2


def test_token_cap_drops_the_first_sentence_that_would_pass_it():
    assert select_under_cap([5, 5, 5], 10) == 2
    assert select_under_cap([5, 5, 5], 9) == 1
    assert select_under_cap([5, 5, 5], 100) == 3


def test_cap_is_exact_on_real_text(tiny, flores_dev):
    counts, n_tokens, n_sent, *_ = record_language(tiny, flores_dev["en"], 300, 5, bos(tiny), batch_size=8)
    lengths = [len(r) - 1 for r in tokenize(tiny.tokenizer, flores_dev["en"], bos(tiny))]
    assert n_sent == select_under_cap(lengths, 300) and n_tokens == sum(lengths[:n_sent]) <= 300
    # every counted token is counted once per neuron at most
    assert (counts <= n_tokens).all()


def test_without_a_bos_every_sentence_starts_after_a_fixed_token_left_out_of_counts_and_means(flores_dev):
    """The tiny Qwen2 model's tokenizer has no BOS (as Qwen2.5's): each sentence is fed after its EOS, which
    takes position 0 (the attention sink) and enters no count and no mean."""
    qwen = load_tiny("qwen2")
    assert qwen.tokenizer.bos_token_id is None and qwen.tokenizer("a b")["input_ids"] == \
        qwen.tokenizer("a b", add_special_tokens=False)["input_ids"]
    prefix = bos(qwen)
    assert (prefix.source, prefix.token_id) == ("eos", qwen.tokenizer.eos_token_id)
    sentences = flores_dev["fr"][:6]
    ids = tokenize(qwen.tokenizer, sentences, prefix)
    assert all(row[0] == prefix.token_id for row in ids)
    counts, n_tokens, _, means, *_ = record_language(qwen, sentences, 10_000, 6, prefix, batch_size=4)
    ref_counts, ref_tokens, ref_means, min_abs = brute_force(qwen, sentences)
    assert n_tokens == ref_tokens == sum(len(r) for r in qwen.tokenizer(sentences, add_special_tokens=False)[
        "input_ids"])
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=1e-4)
    assert (min_abs[counts != ref_counts] < 1e-5).all()


def test_offline_models_prefix_bos_where_the_tokenizer_adds_one_else_eos():
    """Gemma-3 adds a BOS to every text; SmolLM2 adds none (its declared bos is the chat marker <|im_start|>)."""
    from transformers import AutoTokenizer

    from lsn_exp import CONF_DIR, models
    from omegaconf import OmegaConf

    expected = {"gemma3_270m": ("bos", "<bos>"), "smollm2_135m": ("eos", "<|im_end|>")}
    for name, (source, token) in expected.items():
        path = models.converted_dir(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
        if not (path / "lsn_source.json").exists():
            pytest.skip(f"{name} is not converted yet: `make install` prepares it")
        prefix = prefix_token(AutoTokenizer.from_pretrained(str(path)), "auto")
        assert (prefix.source, prefix.token) == (source, token), name


def test_bf16_recording_accumulates_means_in_float32(flores_dev):
    """In bf16 (a GPU's default) sentence means are summed in float32: they equal a float64 mean of the very
    bf16 activations, not a bf16 sum (about 3 significant digits)."""
    handle = load_tiny("llama")
    handle.model.to(torch.bfloat16)
    sentences = flores_dev["en"][:4]
    counts, _, _, means, *_ = record_language(handle, sentences, 10_000, 4, bos(handle), batch_size=1)
    ref_counts, _, ref_means, _ = brute_force(handle, sentences)  # the same bf16 activations, float64 sums
    assert means.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means, ref_means, atol=1e-6, rtol=1e-5)


def test_positive_gate_activation_iff_positive_preactivation():
    """SiLU, GELU and tanh-GELU are > 0 exactly where x > 0, so counting may use the pre-activation."""
    magnitudes = torch.logspace(-30, 4, 20_000, dtype=torch.float64).to(torch.float32)
    x = torch.cat([-magnitudes, torch.zeros(1), magnitudes, torch.randn(100_000) * 5])
    for name in ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new"):
        act = ACT2FN[name]
        assert torch.equal(act(x) > 0, x > 0), name


def test_residual_means_equal_a_hand_computed_mean_over_real_tokens(flores_dev):
    """The DiffMean input: the residual stream after each layer, averaged over every counted token (no padding,
    no prefix token), equals a per-sentence capture of ``hidden_states``, at batch size 1 and 8."""
    handle = load_tiny("qwen2")  # BOS-less: the prefix is the EOS token
    prefix = prefix_token(handle.tokenizer)
    sentences = flores_dev["ja"][:5] + flores_dev["en"][:3]
    rows, norms = [], []
    for ids in tokenize(handle.tokenizer, sentences, prefix):
        with torch.no_grad():
            hidden = handle.adapter.decoder(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        after = torch.stack(hidden[1:])[:, 0, 1:].double()  # [L, T-1, d_model]: after each layer, prefix dropped
        rows.append(after)
        norms.append(after.norm(dim=-1))
    want = torch.cat(rows, dim=1).mean(dim=1)  # [L, d_model]
    want_norm = torch.cat(norms, dim=1).mean(dim=1)  # [L]; the last hidden state is after the final norm: skipped
    for batch_size in (1, 8):
        found = record_language(handle, sentences, 10_000, 4, prefix, batch_size=batch_size)
        assert found.resid_mean.dtype == torch.float32
        torch.testing.assert_close(found.resid_mean[:-1].double(), want[:-1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(found.resid_norm[:-1].double(), want_norm[:-1], atol=1e-4, rtol=1e-4)


def test_a_cap_below_the_first_sentence_is_a_one_line_error(tiny):
    from lsn_exp.errors import UserError
    from lsn_exp.record import Prefix, record_language

    with pytest.raises(UserError, match="identify.max_tokens=2 is below the first"):
        record_language(tiny, ["A sentence with more than two tokens."], 2, 1, Prefix(tiny.tokenizer.bos_token_id, None, "bos"),
                        4, "record fr")
