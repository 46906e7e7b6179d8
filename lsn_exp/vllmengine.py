"""``engine=vllm``: the engine seam (``lsn_exp.engine.Engine``) on a vLLM engine, for the optional install
(``make install-vllm``; this module imports vLLM and is imported only when a job asks for it).

- ``generate``: greedy decoding (temperature 0, the model's stop ids); ``continuation_nll``: prompt log-probs of
  prompt + continuation (``prompt_logprobs=0``: each token's own log-prob), mean over the continuation's tokens.
- ``lm``: lm-eval's own vLLM model class, around this engine instead of a second one (``EngineVLLM``): every
  task, LSS included, scores through lm-eval's vLLM request path (prompt log-probs; ``generate_until``).
- ``intervene``: ``lsn_exp.vllmpatch.VllmIntervention`` (buffers the plugin built into the model).
- ``record``: the transformers model. Recording stays on transformers and the neuron set is shared by both
  engines; that model also gives the patch plan its shapes and the cache keys their dtype, so it stays loaded
  beside vLLM (on a GPU node: both copies on the card; size ``engine.gpu_memory_utilization`` for it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import vllm
from lm_eval.models.utils import configure_pad_token
from lm_eval.models.vllm_causallms import VLLM
from vllm.inputs import TokensPrompt

from lsn_exp import decoding
from lsn_exp.engine import Generated, HFEngine
from lsn_exp.errors import UserError
from lsn_exp.models import ModelHandle, converted_dir
from lsn_exp.settings import EngineSettings
from lsn_exp.vllmpatch import VllmIntervention
from lsn_exp.vllmplugin import ENABLE


def weights_dir(model_cfg, cache_dir: str | None) -> str:
    """What vLLM loads for a configured model: its converted or local checkpoint folder, or its hub id."""
    source = model_cfg.source
    if source == "gguf_package":
        return str(converted_dir(model_cfg, cache_dir))
    if source == "local":
        return str(Path(model_cfg.path).expanduser())
    if source == "hub":
        return str(model_cfg.id)
    raise UserError(f"engine=vllm loads a checkpoint folder or a hub id: model.source={source} has neither")


def start(handle: ModelHandle, model_cfg, settings: EngineSettings, cache_dir: str | None = None,
          steerable: bool = True) -> VLLMEngine:
    """A vLLM engine on the same weights and dtype as ``handle``, its model steerable (lsn_exp.vllmplugin) unless
    ``steerable`` is False (vLLM's own model: benchmarks/bench_engine.py's baseline)."""
    os.environ[ENABLE] = "1" if steerable else "0"  # read by the plugin here and in every process vLLM starts
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends our buffer writer to
    # the engine's own processes (cloudpickle); nothing from outside this job crosses that boundary
    dtype = str(handle.model.dtype).removeprefix("torch.")
    llm = vllm.LLM(model=weights_dir(model_cfg, cache_dir), dtype=dtype, seed=0, enforce_eager=settings.enforce_eager,
                   enable_prefix_caching=settings.enable_prefix_caching, max_model_len=settings.max_model_len,
                   max_num_seqs=settings.max_num_seqs, tensor_parallel_size=settings.tensor_parallel_size,
                   gpu_memory_utilization=settings.gpu_memory_utilization)
    return VLLMEngine(handle, llm)


class VLLMEngine:
    """The stages' engine on ``llm`` (a vllm.LLM built by ``start``); ``handle`` is the same model in transformers."""

    name = "vllm"

    def __init__(self, handle: ModelHandle, llm):
        self.handle, self.llm = handle, llm

    @property
    def cache_key(self) -> dict:
        """What cached scores record of this engine (models.device_key): its kernels round differently."""
        return {"engine": "vllm", "vllm": vllm.__version__}

    def lm(self, batch_size: int | None = None, rolling: bool = False) -> EngineVLLM:
        return EngineVLLM(self.llm, self.handle.tokenizer)

    def sampling(self, max_new_tokens: int, **extra) -> vllm.SamplingParams:
        stops = decoding.stop_ids(self.handle.model, self.handle.tokenizer)
        return vllm.SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens), stop_token_ids=list(stops),
                                   skip_special_tokens=True, **extra)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's tokens as the transformers engine reads them (the tokenizer's special tokens included)."""
        return [self.handle.tokenizer(prompt)["input_ids"] for prompt in prompts]

    def generate(self, prompts: list[str], max_new_tokens: int) -> Generated:
        """Greedy continuations; ``tokens``: each one's new token ids, its stop id and all after it dropped."""
        stops = set(decoding.stop_ids(self.handle.model, self.handle.tokenizer))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in self.prompt_ids(prompts)],
                                    self.sampling(max_new_tokens), use_tqdm=False)
        kept = [_until_stop(list(out.outputs[0].token_ids), stops) for out in outputs]
        texts = [self.handle.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in kept]
        return Generated(texts, kept)

    def continuation_nll(self, prompts: list[str], generated: Generated) -> list[float | None]:
        """Mean NLL per token of each continuation after its prompt, under the engine as it is now."""
        requests = [(ids, ids + list(new)) for ids, new in zip(self.prompt_ids(prompts), generated.tokens)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=whole) for _, whole in requests],
                                    vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                                        detokenize=False), use_tqdm=False)
        return [_mean_nll(out.prompt_logprobs, whole, len(ids)) for (ids, whole), out in zip(requests, outputs)]

    def generation_config(self, max_new_tokens: int) -> dict:
        """The transformers engine's greedy settings (the same decoding) and the engine that ran them."""
        return {**decoding.greedy_config_dict(self.handle.model, self.handle.tokenizer, max_new_tokens),
                **self.cache_key}

    def record(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return HFEngine(self.handle).record(*args, **kwargs)

    def intervene(self, neurons, spec) -> VllmIntervention:
        return VllmIntervention(self.llm, self.handle, neurons, spec)


def _until_stop(ids: list[int], stops: set[int]) -> list[int]:
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def _mean_nll(prompt_logprobs: list, whole: list[int], start: int) -> float | None:
    """Mean of -log p over positions ``start``.. of ``whole`` (vLLM's prompt log-probs hold each token's own)."""
    found = [-prompt_logprobs[i][token].logprob for i, token in enumerate(whole) if i >= start]
    return sum(found) / len(found) if found else None


class EngineVLLM(VLLM):
    """lm-eval's vLLM model class around a running engine: its request paths (log-likelihoods from prompt
    log-probs, greedy ``generate_until``) as lm-eval runs them, without starting a second engine."""

    share_prompts = False  # lmeval.whole_rows toggles it: vLLM scores each request whole anyway

    def __init__(self, llm, tokenizer, batch_size: int | str = "auto", max_gen_toks: int = 256):
        super(VLLM, self).__init__()  # TemplateLM: rank and world size
        model_config = llm.llm_engine.model_config
        self.model, self._config = llm, model_config.hf_config
        self.tokenizer = configure_pad_token(tokenizer, model_config=self._config)
        self.model_args = {"model": model_config.model, "dtype": str(model_config.dtype)}
        self._max_length, self._max_gen_toks, self.batch_size = None, max_gen_toks, batch_size
        self.tensor_parallel_size = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
        self.data_parallel_size, self.truncation_side = 1, "left"
        self.add_bos_token, self.custom_prefix_token_id, self.lora_request = None, None, None
        self.chat_template_args, self.enable_thinking, self.think_end_token = {}, None, None
        self.hf_chat_template = None
