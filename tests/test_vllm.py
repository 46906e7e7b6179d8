"""vLLM on CPU, the optional engine of issue 25 (`make install-vllm`, then `make test-vllm`).

What holds so far: in the overlay environment both offline models load in vLLM (fp32, eager, prefix caching off)
and decode greedily to the same tokens as our Hugging Face engine, unpatched, under the same neuron patches
(lsn_exp.vllmpatch: set to p_max, multiply) and under a DiffMean vector, and leave the engine as they found it.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: one model load
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for a few short prompts
vllm = pytest.importorskip("vllm", reason="vLLM is an optional install: `make install-vllm`, then `make test-vllm`")

from conftest import synthetic_neurons  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lsn_exp import CONF_DIR, data, models, vllmpatch  # noqa: E402
from lsn_exp.engine import engine_of  # noqa: E402
from lsn_exp.errors import UserError  # noqa: E402
from lsn_exp.specs import Intervention, PatchSpec, SteerSpec  # noqa: E402

pytestmark = pytest.mark.vllm
NEW_TOKENS = 16


def openings(root, langs=("en", "fr", "id"), per_lang: int = 4, words: int = 6) -> list[str]:
    """The first words of FLORES devtest sentences, as the steering prompts are cut."""
    return [" ".join(sentence.split()[:words]) for lang in data.languages(list(langs))
            for sentence in data.flores(root, lang, "devtest").sentences[:per_lang]]


@pytest.fixture(scope="module", params=["smollm2_135m", "gemma3_270m"])
def engines(request, data_root):
    """(the model through transformers, the same model in vLLM, the prompts), fp32 on the CPU."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / f"{request.param}.yaml"),
                          {"dtype": "float32", "device": "cpu"})
    handle = models.load(cfg)
    llm = vllm.LLM(model=str(models.converted_dir(cfg)), dtype="float32", enforce_eager=True,
                   enable_prefix_caching=False, max_model_len=256, seed=0)
    return handle, llm, openings(data_root)


def hf_texts(handle, prompts, active=None) -> list[str]:
    """Greedy continuations through our engine, one prompt at a time (no padding), under ``active`` if given."""
    def run():
        return [engine_of(handle).generate([prompt], NEW_TOKENS).texts[0] for prompt in prompts]
    if active is None:
        return run()
    with active:
        return run()


def vllm_texts(llm, prompts) -> list[str]:
    found = llm.generate(prompts, vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS), use_tqdm=False)
    return [out.outputs[0].text.strip() for out in found]


def test_vllm_decodes_the_same_greedy_tokens_as_transformers_in_fp32(engines):
    handle, llm, prompts = engines
    ours = hf_texts(handle, prompts)
    assert vllm_texts(llm, prompts) == ours and all(ours)


@pytest.mark.parametrize("spec", [
    PatchSpec("fr", op="set", source="pmax"), PatchSpec("fr", op="mul", value=4.0),
    Intervention(PatchSpec("fr", op="mul", value=1.0), SteerSpec("fr", alpha=1.0, layers=(2, 4)))],
    ids=["set_pmax", "mul4", "diffmean"])
def test_a_neuron_patch_inside_vllm_decodes_as_the_same_patch_through_transformers(engines, spec):
    handle, llm, prompts = engines
    neurons = synthetic_neurons(handle, ["en", "fr", "id"], rate=0.01, vectors=True)
    unpatched = hf_texts(handle, prompts)
    ours = hf_texts(handle, prompts, engine_of(handle).intervene(neurons, spec))
    with vllmpatch.patched(llm, handle, neurons, spec):
        theirs = vllm_texts(llm, prompts)
    assert theirs == ours and ours != unpatched  # the patch changes continuations, the same way in both engines
    assert vllm_texts(llm, prompts) == unpatched  # and leaves the engine as it found it
    with pytest.raises(UserError, match="does not run inside vLLM"):
        with vllmpatch.patched(llm, handle, neurons, PatchSpec("fr", op="set", stat="max")):
            pass
