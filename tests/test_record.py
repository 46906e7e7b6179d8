"""Recording: counts and means equal a brute-force capture; padding and batch size never leak in."""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from lsn_exp.record import record_language, select_under_cap, tokenize


def brute_force(handle, sentences, add_bos=True):
    """Run every sentence alone, capture every act_fn output, count and average over real tokens."""
    ids = tokenize(handle.tokenizer, sentences, add_bos)
    layers = handle.adapter.n_layers
    counts = torch.zeros(layers, handle.adapter.d_ff, dtype=torch.int64)
    min_abs = torch.full((layers, handle.adapter.d_ff), float("inf"))  # closest any activation gets to 0
    means, acts = [], {}
    hooks = [a.register_forward_hook(lambda m, i, o, l=l: acts.__setitem__(l, o[0, 1:]))
             for l, a in enumerate(handle.adapter.act_fns)]
    try:
        with torch.no_grad():
            for row in ids:
                handle.model(torch.tensor([row]))
                stacked = torch.stack([acts[l] for l in range(layers)])  # [L, T_real, d]
                counts += (stacked > 0).sum(dim=1)
                min_abs = torch.minimum(min_abs, stacked.abs().amin(dim=1))
                means.append(stacked.mean(dim=1))
    finally:
        for h in hooks:
            h.remove()
    return counts, sum(len(r) - 1 for r in ids), torch.stack(means), min_abs


def test_counts_and_means_equal_a_brute_force_capture(tiny, flores_dev):
    sentences = flores_dev["fr"][:12]
    counts, n_tokens, n_sent, means = record_language(tiny, sentences, 10_000, 12, True, batch_size=5)
    ref_counts, ref_tokens, ref_means, min_abs = brute_force(tiny, sentences)
    assert n_tokens == ref_tokens and n_sent == 12
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=1e-4)
    assert (min_abs[counts != ref_counts] < 1e-5).all(), "a count differs away from a near-zero activation"


def test_batch_size_and_padding_never_change_counts_or_means(tiny, flores_dev):
    sentences = flores_dev["ja"][:16] + flores_dev["en"][:8]  # very different lengths -> heavy padding
    one = record_language(tiny, sentences, 10_000, 10, True, batch_size=1)
    eight = record_language(tiny, sentences, 10_000, 10, True, batch_size=8)
    assert one[1:3] == eight[1:3]
    torch.testing.assert_close(one[3], eight[3], atol=1e-5, rtol=1e-4)
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
    counts, n_tokens, n_sent, _ = record_language(tiny, flores_dev["en"], 300, 5, True, batch_size=8)
    lengths = [len(r) - 1 for r in tokenize(tiny.tokenizer, flores_dev["en"], True)]
    assert n_sent == select_under_cap(lengths, 300) and n_tokens == sum(lengths[:n_sent]) <= 300
    # every counted token is counted once per neuron at most
    assert (counts <= n_tokens).all()


def test_positive_gate_activation_iff_positive_preactivation():
    """SiLU, GELU and tanh-GELU are > 0 exactly where x > 0, so counting may use the pre-activation."""
    magnitudes = torch.logspace(-30, 4, 20_000, dtype=torch.float64).to(torch.float32)
    x = torch.cat([-magnitudes, torch.zeros(1), magnitudes, torch.randn(100_000) * 5])
    for name in ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new"):
        act = ACT2FN[name]
        assert torch.equal(act(x) > 0, x > 0), name
