"""Free generation under a patch, labelled with an offline language identifier (py3langid)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lsn_exp.data import language_of

NEUTRAL_PROMPTS = (
    "The weather today is",
    "My favourite food is",
    "Yesterday I went to",
    "The most important thing in life is",
    "When I was a child,",
    "The best way to learn something new is",
    "In the morning, people usually",
    "Here is a short story about a dog:",
)


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    label: str  # py3langid ISO 639-1 code of the continuation


@torch.inference_mode()
def continuations(handle, prompts, max_new_tokens: int = 25) -> list[str]:
    """Greedy continuations of a batch of prompts (left-padded, so every row decodes in step)."""
    tokenizer = handle.tokenizer
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(handle.device)
    finally:
        tokenizer.padding_side = "right"
    out = handle.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, top_p=None,
                                top_k=None, temperature=None, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_labelled(handle, prompts=NEUTRAL_PROMPTS, max_new_tokens: int = 25, patch=None) -> list[Generation]:
    with patch if patch is not None else nullcontext():
        texts = continuations(handle, prompts, max_new_tokens)
    return [Generation(p, t, language_of(t)) for p, t in zip(prompts, texts)]


def share_in(generations: list[Generation], code: str) -> float:
    return sum(g.label == code for g in generations) / max(len(generations), 1)
