"""flores_ppl_<lang>: rolling log-likelihood of FLORES-200 sentences from the data root."""

import datasets

from lsn_exp.data import flores_ppl_docs


def load_flores_ppl(lang: str, data_root=None, flores_split: str = "devtest", **_metadata):
    """``custom_dataset``: one document per sentence of flores200/<split>/<code>.txt."""
    return {"test": datasets.Dataset.from_list(flores_ppl_docs(data_root, lang, flores_split))}


def process_results(doc, results):
    (loglikelihood,) = results
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"byte_perplexity": (loglikelihood, n_bytes), "bits_per_byte": (loglikelihood, n_bytes)}
