"""flores_mt_<lang>: English -> <lang> on FLORES-200 from the data root; corpus chrF++ / BLEU, language ID.

The aggregations are lm-eval's view of the corpus scores; lsn_exp.metrics recomputes them from per-sentence
statistics (for bootstraps and paired deltas) and checks that the two agree.
"""

import datasets
from sacrebleu.metrics import BLEU, CHRF

from lsn_exp.data import flores_mt_docs
from lsn_exp.lid import counts_as, identify
from lsn_exp.metrics import bleu_tokenizer


def load_flores_mt(lang: str, data_root=None, mt_prompt: str = "untargeted", flores_split: str = "devtest",
                   **_metadata):
    """``custom_dataset``: one document per sentence: source (English), target (<lang>), rendered prompt, and the
    BLEU tokenizer this task scores <lang> with."""
    tokenizer = bleu_tokenizer(lang)
    docs = [{**doc, "bleu_tokenize": tokenizer} for doc in flores_mt_docs(data_root, lang, flores_split, mt_prompt)]
    return {"test": datasets.Dataset.from_list(docs)}


def prediction(output: str) -> str:
    """The translation in a raw output: leading whitespace stripped first, then cut at the first newline."""
    return output.lstrip().split("\n", 1)[0].strip()


def process_results(doc, results):
    text = prediction(results[0])
    item = (text, doc["target"], doc["bleu_tokenize"])
    return {"chrf++": item, "bleu": item, "lang_share": float(counts_as(identify([text])[0], doc["lang"])),
            "empty_share": float(text == "")}


def agg_chrfpp(items) -> float:
    """Corpus chrF++ over (prediction, reference, tokenizer) items (one reference per sentence)."""
    preds, refs, _ = zip(*items)
    return CHRF(word_order=2).corpus_score(list(preds), [list(refs)]).score


def agg_bleu(items) -> float:
    """Corpus BLEU with the target language's tokenizer (lsn_exp.metrics.bleu_tokenizer, in every document)."""
    preds, refs, tokenizers = zip(*items)
    return BLEU(tokenize=tokenizers[0]).corpus_score(list(preds), [list(refs)]).score
