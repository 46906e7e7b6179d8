"""Model loading and the named intervention sites."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_ARCH, load_tiny
from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, models
from lsn_exp.errors import UserError


@pytest.mark.parametrize("family", sorted(FAMILY_ARCH))
def test_named_sites_resolve_to_the_gate_activation_down_proj_and_residual_stream(family):
    handle = load_tiny(family)
    adapter = handle.adapter
    assert adapter.n_layers == 4 and adapter.d_ff == 128
    assert set(adapter.sites) == set(models.SITES)
    assert all(len(adapter.site(name)) == 4 for name in models.SITES)
    assert len({id(a) for a in adapter.site("mlp.gate")}) == 4
    captured = {}
    layer = 2
    adapter.site("mlp.gate")[layer].register_forward_hook(lambda m, i, o: captured.update(act=o, gate_in=i[0]))
    adapter.site("mlp.down")[layer].register_forward_hook(lambda m, i, o: captured.update(down_in=i[0]))
    adapter.site("resid_post")[layer].register_forward_hook(lambda m, i, o: captured.update(resid=o))
    handle.model.model.layers[layer + 1].register_forward_pre_hook(lambda m, a, k: captured.update(next_in=a[0] if a else
                                                                                                   k["hidden_states"]),
                                                                    with_kwargs=True)
    ids = handle.tokenizer(["Hello world, this is a test."], return_tensors="pt").input_ids
    mlp = handle.model.model.layers[layer].mlp
    mlp.register_forward_hook(lambda m, i, o: captured.update(mlp_in=i[0]))
    with torch.no_grad():
        handle.model(ids)
        gate = mlp.gate_proj(captured["mlp_in"])
        up = mlp.up_proj(captured["mlp_in"])
    assert torch.equal(captured["gate_in"], gate)  # the mlp.gate site sees gate_proj(x)
    torch.testing.assert_close(captured["down_in"], captured["act"] * up)  # mlp.down column j <-> neuron j
    resid = captured["resid"][0] if isinstance(captured["resid"], tuple) else captured["resid"]
    assert resid.shape == (1, ids.shape[1], handle.model.config.hidden_size)
    assert torch.equal(resid, captured["next_in"])  # resid_post of layer l is what layer l+1 reads


def test_an_unknown_site_names_the_known_ones():
    with pytest.raises(KeyError, match="mlp.gate, mlp.down, resid_post"):
        load_tiny().adapter.site("attn.q")


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*llama, qwen2, mistral, gemma"):
        models.find_adapter(model)


def test_tiny_models_are_reproducible_from_their_seed():
    a, b, c = load_tiny(seed=1), load_tiny(seed=1), load_tiny(seed=2)
    assert a.identity == b.identity != c.identity
    assert torch.equal(a.adapter.site("mlp.down")[0].weight, b.adapter.site("mlp.down")[0].weight)
    assert not torch.equal(a.adapter.site("mlp.down")[0].weight, c.adapter.site("mlp.down")[0].weight)


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


def _cache_keys(handle, data_root) -> dict:
    """The key of every 16-bit-sensitive cache entry a job writes: recordings, LSS, downstream and generation."""
    from lsn_exp import downstream, generate, identify, lss
    from lsn_exp.cache import key_of
    from lsn_exp.settings import eval_settings, generate_settings, identify_settings, lss_settings

    settings = identify_settings(OmegaConf.merge(OmegaConf.load(CONF_DIR / "identify" / "lape.yaml"),
                                                 {"languages": ["en", "fr"]}))
    evaluated = eval_settings({"tasks": ["xcopa"], "limit": 2})
    scores = lss.LssEvaluator(handle, lss_settings({"n_facts": 2, "sources": ["en"]}), data_root, None).unpatched
    return {"recording": key_of(identify.recording_plan(settings, handle, data_root)[2]["en"]),
            "lss": key_of(scores.spec("en", "fr")),
            "downstream": key_of(downstream.unpatched_spec(handle, downstream.plan(evaluated)[0], data_root,
                                                           evaluated)),
            "generate": key_of(generate.unpatched_spec(handle, {"en": ["Hello"]}, generate_settings({})))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16_bit_cache_keys_name_the_accelerator_and_fp32_keys_stay_as_they_were(dtype, data_root):
    """16-bit kernels round differently on another card or library version: a 16-bit key holds the accelerator's
    name (and torch / CUDA versions), so an entry from one GPU model is never read on another. fp32 keys keep
    the device kind alone, so existing fp32 caches stay valid."""
    from dataclasses import replace

    handle = load_tiny()
    handle.model.to(dtype)
    here = models.device_key(handle)
    one, other = replace(handle, device_name="Card A"), replace(handle, device_name="Card B")
    keys_one, keys_other = _cache_keys(one, data_root), _cache_keys(other, data_root)
    if dtype == torch.float32:
        assert here == {"device": "cpu"}
        assert keys_one == keys_other
    else:
        assert here["device"] == "cpu" and here["kernels"]["torch"] == torch.__version__ and here["kernels"]["name"]
        assert models.device_key(one)["kernels"]["name"] == "Card A"
        assert all(keys_one[k] != keys_other[k] for k in keys_one), (keys_one, keys_other)


def test_jobs_sharing_a_fresh_cache_assemble_the_gguf_once_and_a_damaged_one_again(tmp_path):
    """Two jobs on a fresh cache used to race: the second read the first's half-written GGUF and stopped."""
    from concurrent.futures import ThreadPoolExecutor

    from lsn_exp.files import sha256_file

    cfg = OmegaConf.load(CONF_DIR / "model" / "gemma3_270m.yaml")
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: models.gguf_file(cfg, str(tmp_path)), range(2)))
    assert paths[0] == paths[1] and not list(paths[0].parent.glob("*.tmp*"))
    good = sha256_file(paths[0])
    with open(paths[0], "r+b") as f:  # a killed or damaged assembly
        f.truncate(1000)
    assert models.gguf_file(cfg, str(tmp_path)) == paths[0] and sha256_file(paths[0]) == good
