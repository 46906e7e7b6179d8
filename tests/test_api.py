"""lsn_exp.api on an in-memory model: the CLI's code paths, its cache, bit-for-bit restore; the example runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import load_tiny
from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, REPO_ROOT, api, identify, lss
from lsn_exp.cache import CacheStore
from lsn_exp.errors import UserError
from lsn_exp.settings import identify_settings, lss_settings
from lsn_exp.specs import PatchSpec, parse_factor
from lsn_exp.steer import intervene

LANGS = ["en", "fr", "ja"]


@pytest.fixture(scope="module")
def user_model():
    loaded = load_tiny("llama", seed=3)  # stands for a model the user loaded themselves
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def neurons(user_model, tmp_path_factory, data_root):
    model, tokenizer = user_model
    return api.identify(model, tokenizer, "flores", languages=LANGS, max_tokens=300, data_root=data_root,
                        cache_dir=str(tmp_path_factory.mktemp("cache")))


@torch.inference_mode()
def logits(model, tokenizer):
    batch = tokenizer(["The weather today is", "Il était une fois"], padding=True, return_tensors="pt")
    return model(**batch).logits


def test_identify_runs_the_cli_code_path_and_cache(user_model, neurons, data_root, tmp_path):
    model, tokenizer = user_model
    assert neurons.languages == LANGS
    cfg = identify_settings({"languages": LANGS, "max_tokens": 300})
    store = CacheStore(tmp_path)
    built = identify.build(cfg, api.handle(model), data_root, store, seed=0)
    assert built.recorded
    for name in ("lape", "baseline", "random"):
        assert torch.equal(built.neurons.masks[name], neurons.masks[name])
    assert torch.equal(built.neurons.p_max, neurons.p_max)
    again = identify.build(cfg, api.handle(model), data_root, store, seed=0)
    assert not again.recorded  # cached under the in-memory model's weights identity


def test_identify_on_your_own_texts(user_model, tmp_path):
    model, tokenizer = user_model
    texts = {"en": ["The cat sat on the mat."] * 6, "xx": ["Zorb blat quenn vrip."] * 6}
    art = api.identify(model, tokenizer, texts, cache_dir=str(tmp_path))
    assert art.languages == ["en", "xx"] and art.masks["lape"].shape[0] == 2
    with pytest.raises(UserError, match="texts='wiki'"):
        api.identify(model, tokenizer, "wiki")


def test_a_changed_weight_is_another_model_for_the_cache(user_model):
    model, _ = user_model
    other = load_tiny("llama", seed=4).model
    assert api.handle(model).identity["weights_sample"] != api.handle(other).identity["weights_sample"]


def test_amplify_is_the_cli_patch_and_restores_bit_for_bit(user_model, neurons):
    model, tokenizer = user_model
    before = logits(model, tokenizer)
    spec = PatchSpec.from_config(OmegaConf.load(CONF_DIR / "patch" / "default.yaml"), parse_factor("pmax"), "ja")
    with intervene(api.handle(model), neurons, spec):
        want = logits(model, tokenizer)
    with api.amplify(model, neurons, lang="ja", factor="pmax") as applied:
        got = logits(model, tokenizer)
    assert applied.describe() == "ja:lape:set=pmax"
    assert torch.equal(got, want) and not torch.equal(got, before)
    assert torch.equal(logits(model, tokenizer), before)
    with api.amplify(model, neurons, lang="ja", factor=1, alpha=0.5):  # the DiffMean vector alone
        assert not torch.equal(logits(model, tokenizer), before)
    assert torch.equal(logits(model, tokenizer), before)
    with pytest.raises(UserError, match="lang=th has no neurons"):
        with api.amplify(model, neurons, lang="th"):
            pass


def test_lss_equals_the_stage(user_model, neurons, data_root, tmp_path):
    model, tokenizer = user_model
    got = api.lss(model, tokenizer, neurons, "fr", n_facts=4, sources=LANGS, bootstrap=0, data_root=data_root,
                  cache_dir=str(tmp_path))
    cfg = lss_settings({"n_facts": 4, "sources": LANGS, "bootstrap": 0})
    spec = PatchSpec.from_config(OmegaConf.load(CONF_DIR / "patch" / "default.yaml"), parse_factor("pmax"), "fr")
    want = lss.lss_for_target(api.handle(model), neurons, spec, cfg, data_root, None)
    assert [c.source for c in got.cells] == ["en", "ja"]
    assert [c.outcomes for c in got.cells] == [c.outcomes for c in want.cells]


@pytest.mark.slow  # a subprocess that records and scores (about 12 s); the API itself is tested in-process above
def test_the_example_script_runs_on_a_tiny_model():
    result = subprocess.run([sys.executable, "examples/api_example.py", "--model", "tiny", "--max-tokens", "300",
                             "--n-facts", "3", "--new-tokens", "5"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LAPE neurons:" in result.stdout and "id:lape:set=pmax:" in result.stdout
    assert "LSS toward id over 3 facts" in result.stdout


@pytest.mark.slow
def test_the_example_script_runs_on_gemma():
    result = subprocess.run([sys.executable, "examples/api_example.py", "--max-tokens", "3000", "--n-facts", "10"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LSS toward id over 10 facts" in result.stdout
