"""flores_mt_<lang>: English -> <lang> on FLORES-200 from the data root; corpus chrF++ / BLEU, language ID."""

import datasets

from lsn_exp.downstream import corpus_score, flores_mt_docs, output_language


def load_flores_mt(lang: str, data_root=None, mt_prompt: str = "untargeted", flores_split: str = "devtest",
                   **_metadata):
    """``custom_dataset``: one document per sentence: source (English), target (<lang>), rendered prompt."""
    return {"test": datasets.Dataset.from_list(flores_mt_docs(data_root, lang, flores_split, mt_prompt))}


def prediction(output: str) -> str:
    """The translation in a raw output: leading whitespace stripped first, then cut at the first newline."""
    return output.lstrip().split("\n", 1)[0].strip()


def process_results(doc, results):
    text = prediction(results[0])
    item = (text, doc["target"], doc["lang"])
    return {"chrf++": item, "bleu": item, "lang_share": float(output_language(text) == doc["lang"]),
            "empty_share": float(text == "")}


def agg_chrfpp(items) -> float:
    """Corpus chrF++ over (prediction, reference, lang) items (one reference per sentence)."""
    preds, refs, langs = zip(*items)
    return corpus_score("chrf++", preds, refs, langs[0])


def agg_bleu(items) -> float:
    """Corpus BLEU with the target language's tokenizer (downstream.bleu_tokenizer)."""
    preds, refs, langs = zip(*items)
    return corpus_score("bleu", preds, refs, langs[0])
