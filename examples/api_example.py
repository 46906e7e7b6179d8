"""lsn_exp's Python API end to end on a model loaded with plain transformers (not through lsn_exp's configs).

    .venv/bin/python examples/api_example.py                      # Gemma-3-270M (offline, converted once)
    .venv/bin/python examples/api_example.py --model tiny          # a random-init tiny Llama (seconds)

Identifies language neurons on FLORES-200 dev (capped at --max-tokens per language), generates with and
without the Indonesian neurons set to p_max, and scores LSS toward Indonesian on a few mLAMA facts.
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from lsn_exp import CONF_DIR, api, models


def load(name: str):
    """The model and tokenizer as a user would load them: AutoModelForCausalLM on a checkpoint directory."""
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    if cfg.source == "tiny":  # random init: no checkpoint exists, build it as the tests do
        handle = models.load(cfg)
        return handle.model, handle.tokenizer
    path = str(models.ensure_converted(cfg))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3_270m", help="a conf/model name: gemma3_270m, smollm2_135m, tiny")
    parser.add_argument("--languages", default="en,id,ja,fr")
    parser.add_argument("--max-tokens", type=int, default=20000, help="FLORES dev tokens recorded per language")
    parser.add_argument("--n-facts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model)
    languages = args.languages.split(",")

    neurons = api.identify(model, tokenizer, "flores", languages=languages, max_tokens=args.max_tokens)
    print("LAPE neurons:", {code: int(neurons.mask("lape", code).sum()) for code in neurons.languages})

    prompt = tokenizer("The weather today is", return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(**prompt, max_new_tokens=args.new_tokens, do_sample=False)
        with api.amplify(model, neurons, lang="id", factor="pmax") as spec:
            steered = model.generate(**prompt, max_new_tokens=args.new_tokens, do_sample=False)
    width = prompt["input_ids"].shape[1]
    print("unpatched:", repr(tokenizer.decode(plain[0, width:], skip_special_tokens=True)))
    print(f"{spec.describe()}:", repr(tokenizer.decode(steered[0, width:], skip_special_tokens=True)))

    result = api.lss(model, tokenizer, neurons, target="id", factor="pmax", n_facts=args.n_facts,
                     sources=[c for c in languages if c != "id"], bootstrap=0)
    print(f"LSS toward id over {result.n_facts} facts: mean {result.mean:.3f} (paper count {result.mean_paper:.3f})")
    for cell in result.cells:
        print(f"  {cell.source} -> id: {cell.lss:.3f}")


if __name__ == "__main__":
    main()
