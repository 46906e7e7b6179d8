"""vLLM on CPU, the optional engine of issue 25 (`make install-vllm`, then `make test-vllm`).

What holds so far: in the overlay environment both offline models load in vLLM (fp32, eager, prefix caching off)
and decode greedily to the same tokens as our Hugging Face engine. The interventions inside vLLM come next.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: one model load
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for a few short prompts
vllm = pytest.importorskip("vllm", reason="vLLM is an optional install: `make install-vllm`, then `make test-vllm`")

from omegaconf import OmegaConf  # noqa: E402

from lsn_exp import CONF_DIR, data, models  # noqa: E402
from lsn_exp.engine import engine_of  # noqa: E402

pytestmark = pytest.mark.vllm
NEW_TOKENS = 16


def openings(root, langs=("en", "fr", "id"), per_lang: int = 4, words: int = 6) -> list[str]:
    """The first words of FLORES devtest sentences, as the steering prompts are cut."""
    return [" ".join(sentence.split()[:words]) for lang in data.languages(list(langs))
            for sentence in data.flores(root, lang, "devtest").sentences[:per_lang]]


@pytest.mark.parametrize("name", ["smollm2_135m", "gemma3_270m"])
def test_vllm_decodes_the_same_greedy_tokens_as_transformers_in_fp32(name, data_root):
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"), {"dtype": "float32", "device": "cpu"})
    prompts = openings(data_root)
    handle = models.load(cfg)
    ours = [engine_of(handle).generate([prompt], NEW_TOKENS).texts[0] for prompt in prompts]  # no padding
    llm = vllm.LLM(model=str(models.converted_dir(cfg)), dtype="float32", enforce_eager=True,
                   enable_prefix_caching=False, max_model_len=256, seed=0)
    found = llm.generate(prompts, vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS), use_tqdm=False)
    theirs = [out.outputs[0].text.strip() for out in found]
    assert theirs == ours and all(ours)
