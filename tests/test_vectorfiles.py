"""DiffMean vectors exported for lm-eval's ``steered`` model and as llama.cpp control vectors (lsn_exp.vectorfiles)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny, synthetic_neurons

from lsn_exp import api, vectorfiles
from lsn_exp.errors import UserError
from lsn_exp.specs import SteerSpec
from lsn_exp.steer import steering_vectors

LANGS = ["en", "fr", "ja"]


@pytest.fixture(scope="module")
def model_and_neurons():
    handle = load_tiny("llama")
    return handle, synthetic_neurons(handle, LANGS, vectors=True)


@pytest.mark.parametrize("suffix", [".pt", ".gguf"])
def test_both_files_read_back_the_vectors_amplify_adds_bit_for_bit(model_and_neurons, tmp_path, suffix):
    handle, neurons = model_and_neurons
    path = api.export_vectors(handle.model, neurons, "fr", tmp_path / f"fr{suffix}", alpha=0.5, steer_layers=[1])
    read = vectorfiles.read_steered(path) if suffix == ".pt" else vectorfiles.read_control_vector(path)
    ours = steering_vectors(neurons, SteerSpec("fr", 0.5, (1,)), handle.adapter.n_layers)
    assert set(read) == {1} and torch.equal(read[1], ours[1]) and ours[1].norm() > 0


def test_a_control_vector_refuses_layer_0_and_a_file_names_its_format(model_and_neurons, tmp_path):
    handle, neurons = model_and_neurons
    with pytest.raises(UserError, match="start at layer 1"):
        api.export_vectors(handle.model, neurons, "fr", tmp_path / "fr.gguf", alpha=0.5, steer_layers=[0])
    with pytest.raises(UserError, match=r"\.pt file .* or a \.gguf file"):
        api.export_vectors(handle.model, neurons, "fr", tmp_path / "fr.txt", alpha=0.5)
    torch.save({"layers.1.mlp": {"action": "clamp", "steering_vector": torch.ones(4)}}, tmp_path / "clamp.pt")
    with pytest.raises(UserError, match="not an add on a decoder layer"):
        vectorfiles.read_steered(tmp_path / "clamp.pt")


@pytest.mark.slow  # two lm-eval model loads: about 20 s
def test_lm_evals_steered_model_scores_exactly_as_our_vector_path(model_and_neurons, tmp_path):
    """The same lm-eval scorer (HFLM) with our steer installed and lm-eval's SteeredModel reading our file give the
    same log-likelihoods bit for bit; without the vector they differ."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.hf_steered import SteeredModel
    from lm_eval.models.huggingface import HFLM

    handle, neurons = model_and_neurons
    folder = tmp_path / "model"
    handle.model.save_pretrained(folder)
    handle.tokenizer.save_pretrained(folder)
    path = api.export_vectors(handle.model, neurons, "fr", tmp_path / "fr.pt", alpha=2.0, steer_layers="1-2")
    requests = [Instance("loglikelihood", {}, (context, continuation), i) for i, (context, continuation) in
                enumerate([("The market opened", " higher today"), ("Le marché", " a ouvert"), ("市場は", "開いた")])]
    options = {"device": "cpu", "dtype": "float32", "batch_size": 2}
    plain = HFLM(pretrained=str(folder), **options)
    theirs = SteeredModel(pretrained=str(folder), steer_path=str(path), **options).loglikelihood(requests)
    with api.amplify(plain.model, neurons, "fr", factor=1, alpha=2.0, steer_layers="1-2"):
        ours = plain.loglikelihood(requests)
    assert ours == theirs
    assert plain.loglikelihood(requests) != theirs
