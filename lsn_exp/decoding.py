"""Greedy decoding, one explicit definition for free generation (lsn_exp.generate) and lm-eval's generate_until.

- stop ids: every id the model stops on, ``generation_config.eos_token_id`` (an int or a list: Gemma-2-it
  stops on 1 and 107 ``<end_of_turn>``, Qwen2.5-Instruct on 151643 and 151645) plus the tokenizer's EOS.
- ``greedy_config``: a complete GenerationConfig (argmax, no penalty, no banned or forced token). Nothing else
  of the model's own generation config applies: Qwen2.5-Instruct's repetition_penalty 1.05, for one.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig


def stop_ids(model, tokenizer) -> list[int]:
    """The ids a continuation ends at: the model's generation_config.eos_token_id and the tokenizer's EOS."""
    found = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if found is None else [found] if isinstance(found, int) else list(found)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids})


def greedy_config_dict(model, tokenizer, max_new_tokens: int) -> dict:
    """Every decoding setting of a greedy continuation (what results.json records)."""
    return {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_new_tokens": int(max_new_tokens),
            "min_new_tokens": None, "min_length": 0, "temperature": None, "top_k": None, "top_p": None, "min_p": None,
            "typical_p": None, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "length_penalty": 1.0,
            "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
            "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
            "renormalize_logits": False, "remove_invalid_values": False, "guidance_scale": None,
            "stop_strings": None, "eos_token_id": stop_ids(model, tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "use_cache": True}


def greedy_config(model, tokenizer, max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(**greedy_config_dict(model, tokenizer, max_new_tokens))


def greedy_generate(model, config: GenerationConfig, **inputs) -> torch.Tensor:
    """``model.generate`` under ``config`` alone. generate() fills every field a config leaves None (no bad
    words, no forced token ...) from ``model.generation_config``, so that is ``config`` during the call."""
    saved = model.generation_config
    model.generation_config = config
    try:
        return model.generate(generation_config=config, **inputs)
    finally:
        model.generation_config = saved


def ended(new_tokens: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """[B, N] True at each row's first stop id and everything after it."""
    hit = torch.isin(new_tokens, torch.tensor(stops, device=new_tokens.device))
    return hit.long().cumsum(dim=1) > 0
