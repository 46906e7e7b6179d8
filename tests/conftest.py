"""Shared fixtures: tiny random models of every supported family, the data root, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, REPO_ROOT, data, models

# Tiny models gain nothing from threads, and on a shared CPU oversubscribed threads cost a lot;
# tests marked slow (the real Gemma-3-270M) get torch's default back.
DEFAULT_THREADS = torch.get_num_threads()
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_for_real_models(request):
    if request.node.get_closest_marker("slow"):
        torch.set_num_threads(DEFAULT_THREADS)
        yield
        torch.set_num_threads(1)
    else:
        yield


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Extra config keys each family needs for a tiny shape (on top of conf/model/tiny.yaml).
FAMILY_ARCH = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": None},
    "gemma": {"hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {"query_pre_attn_scalar": 16, "sliding_window": 64},
    "gemma3_text": {"query_pre_attn_scalar": 16, "sliding_window": 64},
}


BOS_LESS = ("qwen2",)  # built with a tokenizer that has no BOS, like the real Qwen2.5


def tiny_config(model_type: str = "llama", seed: int = 0, **arch):
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    cfg.arch.model_type = model_type
    cfg.seed = seed
    cfg.bos = model_type not in BOS_LESS
    for key, value in {**FAMILY_ARCH[model_type], **arch}.items():
        cfg.arch[key] = value
    return cfg


def load_tiny(model_type: str = "llama", seed: int = 0, **arch) -> models.ModelHandle:
    return models.load(tiny_config(model_type, seed, **arch))


@pytest.fixture(scope="session")
def tiny() -> models.ModelHandle:
    return load_tiny("llama")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = data.resolve_root(os.environ.get(data.DATA_ENV))
    if root is None:
        pytest.skip("no local data root: tests read ../shared/data (or LSN_DATA)")
    return root


@pytest.fixture(scope="session")
def flores_dev(data_root):
    return {lang.code: data.flores(data_root, lang, "dev").sentences for lang in data.languages(["en", "fr", "ja"])}


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m lsn_exp ARGS`` from the repo root, as a user would run it."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset it
    return subprocess.run([sys.executable, "-m", "lsn_exp", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def synthetic_neurons(handle, languages: list[str], rate: float = 0.1, seed: int = 0, vectors: bool = False):
    """Random neuron sets (about ``rate`` of each layer) for ``languages``, p_max > p_median > 0; with ``vectors``
    also random per-language residual means (what DiffMean reads)."""
    from lsn_exp.neuronset import NeuronSet

    gen = torch.Generator().manual_seed(seed)
    shape = (len(languages), handle.adapter.n_layers, handle.adapter.d_ff)
    masks = {name: torch.rand(shape, generator=gen) < rate for name in ("lape", "baseline", "random")}
    p_max = torch.rand(shape, generator=gen) + 0.5
    means = torch.randn(len(languages), handle.adapter.n_layers, handle.model.config.hidden_size,
                        generator=torch.Generator().manual_seed(1)) if vectors else None
    return NeuronSet(languages=list(languages), masks=masks, p_max=p_max, p_median=p_max / 3,
                     activation_prob=torch.rand(shape, generator=gen), meta={"synthetic": True}, resid_mean=means,
                     resid_norm=None if means is None else means.norm(dim=-1))


def pytest_terminal_summary(terminalreporter):
    """The fault suite's figures (tests/test_faults.py), one row per fault kind, when any fault test ran."""
    from faultlib import FIGURES, summary_table

    if FIGURES:
        terminalreporter.section("fault suite: faults injected and survived")
        terminalreporter.write_line(summary_table(FIGURES))
