"""On paper: the paper's grid on one H100 and on a 4-GPU SLURM node, from counted work and bf16 throughput.

    .venv/bin/python benchmarks/paper_grid.py [--factors 3] [--mfu 0.4] [--gpus 4]

Work is counted, not guessed: the tokens every stage feeds and the positions it scores, from our own
requests on the local data (identification: all of FLORES-200 dev; LSS: the 185-fact sample from every
source toward every target; the factor search: lss.search on 40 facts; downstream: XCOPA, XWinograd,
FLORES MT and perplexity on every document), tokenized with Gemma-3's tokenizer as the stand-in for the
paper's (Gemma-2 shares its 256k vocabulary; Qwen2.5's 152k one splits these scripts somewhat more finely).
FLOPs per token come from each paper model's shapes (config.json on the HF hub): 2 per body weight plus
attention, and 2 per LM-head weight at every scored position. Time = FLOPs / (peak bf16 x --mfu) for
prefill; a decoding step reads every weight once, so generation costs max(weight bytes / (HBM bandwidth x
0.7), its FLOPs at --mfu) per step of a --gen-batch batch. INCLUDE is hub-only and not counted.

Grid per model: identification once; the factor search; the unpatched evaluation once; then for each of the
18 languages and --factors factors one job: LSS toward it (14 sources x 185 facts) and every task in every
language (the self- and cross-language matrix).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from omegaconf import OmegaConf
from roofline import ScoringWork

from lsn_exp import CONF_DIR, data, lmeval, lss, models
from lsn_exp.settings import lss_settings
from lsn_exp.taskindex import TASK_FAMILIES


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def body_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    def body_flops(self, context: float) -> float:
        return 2 * self.body_params + 4 * self.heads * self.head_dim * context * self.layers

    @property
    def head_flops(self) -> float:
        return 2 * self.hidden * self.vocab

    @property
    def weight_bytes(self) -> float:  # bf16, body + head (+ tied or untied embeddings are not read per step)
        return 2 * (self.body_params + self.hidden * self.vocab)


PAPER_MODELS = {  # hidden, intermediate, layers, heads, kv heads, head dim, vocab (each model's config.json)
    "Qwen2.5-7B": Arch(3584, 18944, 28, 28, 4, 128, 152064),
    "Gemma-2-9B": Arch(3584, 14336, 42, 16, 8, 256, 256000),
    "SeaLLMs-v3-7B": Arch(3584, 18944, 28, 28, 4, 128, 152064),  # Qwen2-7B shapes
}
H100 = {"name": "H100 SXM", "bf16_tflops": 989.0, "hbm_tbs": 3.35}


@dataclass
class Work:
    """Prefill work (fed tokens, their mean context, scored positions) and generation (sequences, new tokens)."""

    fed: float = 0.0
    context_sum: float = 0.0
    scored: float = 0.0
    sequences: float = 0.0
    new_tokens: int = 0

    def add_scoring(self, work: ScoringWork, times: float = 1.0) -> Work:
        self.fed += work.fed_tokens * times
        self.context_sum += work.fed_tokens * work.mean_context * times
        self.scored += work.scored_positions * times
        return self

    def scaled(self, times: float) -> Work:
        return Work(self.fed * times, self.context_sum * times, self.scored * times, self.sequences * times,
                    self.new_tokens)

    def seconds(self, arch: Arch, gpu: dict, mfu: float, gen_batch: int) -> float:
        rate = gpu["bf16_tflops"] * 1e12 * mfu
        context = self.context_sum / max(self.fed, 1)
        prefill = (self.fed * arch.body_flops(context) + self.scored * arch.head_flops) / rate
        step = max(arch.weight_bytes / (gpu["hbm_tbs"] * 1e12 * 0.7),
                   gen_batch * (arch.body_flops(context) + arch.head_flops) / rate)
        return prefill + self.sequences / gen_batch * self.new_tokens * step


def identification_work(tokenizer, root) -> Work:
    tokens = 0
    for lang in data.languages(list(data.LANG_ORDER)):
        tokens += sum(len(ids) + 1 for ids in tokenizer(data.flores(root, lang, "dev").sentences,
                                                       add_special_tokens=False)["input_ids"])
    lengths = tokens / (997 * 18)
    return Work(fed=tokens, context_sum=tokens * lengths / 2)


def lss_work(handle, n_facts: int) -> Work:
    evaluator = lss.LssEvaluator(handle, lss_settings({"n_facts": n_facts, "bootstrap": 0}), None, None)
    work = Work()
    for target in data.LSS_LANGS:
        work.add_scoring(ScoringWork.of(evaluator.lm, [i.args for i in evaluator._requests_toward(target)[2]]))
    return work


def downstream_work(handle, root) -> Work:
    lm = lmeval.hflm(handle)
    manager = lmeval.task_manager(metadata={"data_root": str(root), "flores_split": "devtest",
                                              "mt_prompt": "untargeted"})
    names = [family.task(lang) for family in TASK_FAMILIES.values() if family.local for lang in family.langs()]
    work = Work(new_tokens=50)
    for name, task in manager.load(names)["tasks"].items():
        instances = lmeval.build_instances(task)
        kind = instances[0].request_type
        if kind == "loglikelihood":
            work.add_scoring(ScoringWork.of(lm, [i.args for i in instances]))
        elif kind == "loglikelihood_rolling":
            n = sum(len(handle.tokenizer(i.args[0])["input_ids"]) for i in instances)
            work.add_scoring(ScoringWork(n, n, 20.0, len(instances)))
        else:  # generate_until: the prompt, then up to 50 greedy steps
            n = sum(len(handle.tokenizer(i.args[0])["input_ids"]) for i in instances)
            work.add_scoring(ScoringWork(n, len(instances), n / len(instances) / 2, len(instances)))
            work.sequences += len(instances)
        print(f"  {name}: {len(instances)} {kind} requests")
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=int, default=3, help="factors per language (e.g. pmax, pmedian, best)")
    parser.add_argument("--search-entries", type=int, default=9, help="lss.search.grid entries")
    parser.add_argument("--mfu", type=float, default=0.4, help="share of peak bf16 a prefill reaches")
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--gpus", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    handle = models.load(OmegaConf.load(CONF_DIR / "model" / "gemma3_270m.yaml"))
    root = data.resolve_root(None)
    stages = {"identify": identification_work(handle.tokenizer, root)}
    matrix = lss_work(handle, 185)
    stages["factor search"] = lss_work(handle, 40).scaled(args.search_entries)
    stages["LSS jobs"] = matrix.scaled(18 * args.factors / 15)  # one target per job; 18 jobs' worth per factor
    stages["downstream"] = downstream_work(handle, root).scaled(1 + 18 * args.factors)
    print(f"grid per model: identify, factor search ({args.search_entries} entries x 15 targets x 40 facts), "
          f"{18 * args.factors} jobs (18 languages x {args.factors} factors) + the unpatched evaluation")
    print(f"{'model':14s} " + " ".join(f"{s:>14s}" for s in stages) + f" {'total h':>9s} {'4-GPU node h':>13s}")
    for name, arch in PAPER_MODELS.items():
        hours = [w.seconds(arch, H100, args.mfu, args.gen_batch) / 3600 for w in stages.values()]
        print(f"{name:14s} " + " ".join(f"{h:13.2f}h" for h in hours) + f" {sum(hours):9.2f} "
              f"{sum(hours) / args.gpus:13.2f}")
    for stage, w in stages.items():
        print(f"work {stage}: {w.fed / 1e6:.2f}M fed tokens, {w.scored / 1e6:.2f}M scored positions, "
              f"{w.sequences:.0f} generated sequences")


if __name__ == "__main__":
    main()
