"""Model loading and the architecture adapter."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, models
from lsn_exp.errors import UserError
from conftest import FAMILY_ARCH, load_tiny


@pytest.mark.parametrize("family", sorted(FAMILY_ARCH))
def test_adapter_finds_the_gate_activation_site(family):
    handle = load_tiny(family)
    adapter = handle.adapter
    assert adapter.n_layers == 4 and adapter.d_ff == 128
    assert len({id(a) for a in adapter.act_fns}) == 4
    captured = {}
    layer = 2
    adapter.act_fns[layer].register_forward_hook(lambda m, i, o: captured.update(act=o, gate_in=i[0]))
    adapter.down_projs[layer].register_forward_hook(lambda m, i, o: captured.update(down_in=i[0]))
    ids = handle.tokenizer(["Hello world, this is a test."], return_tensors="pt").input_ids
    mlp = adapter.layers[layer].mlp
    mlp.register_forward_hook(lambda m, i, o: captured.update(mlp_in=i[0]))
    with torch.no_grad():
        handle.model(ids)
        gate = adapter.gate_projs[layer](captured["mlp_in"])
        up = mlp.up_proj(captured["mlp_in"])
    assert torch.equal(captured["gate_in"], gate)  # act_fn sees gate_proj(x)
    torch.testing.assert_close(captured["down_in"], captured["act"] * up)  # down_proj column j <-> neuron j


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*llama, qwen2, mistral, gemma"):
        models.find_adapter(model)


def test_tiny_models_are_reproducible_from_their_seed():
    a, b, c = load_tiny(seed=1), load_tiny(seed=1), load_tiny(seed=2)
    assert a.identity == b.identity != c.identity
    assert torch.equal(a.adapter.down_projs[0].weight, b.adapter.down_projs[0].weight)
    assert not torch.equal(a.adapter.down_projs[0].weight, c.adapter.down_projs[0].weight)


@pytest.mark.slow
def test_cached_gemma_gives_the_same_logits_as_the_gguf():
    """The safetensors conversion cache is exact: same logits as loading the GGUF directly."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "gemma3_270m.yaml")
    cached = models.load(cfg)
    gguf = models.gguf_file(cfg)
    direct, _ = models._from_pretrained(str(gguf.parent), dtype=torch.float32, gguf_file=gguf.name)
    ids = cached.tokenizer(["The capital of Indonesia is", "Ibu kota Indonesia adalah"], return_tensors="pt",
                           padding=True)
    with torch.no_grad():
        expected = direct.eval()(**ids).logits
        got = cached.model(**ids).logits
    assert torch.equal(expected, got)
    assert cached.identity["gguf_sha256"] == models.sha256_file(gguf)
