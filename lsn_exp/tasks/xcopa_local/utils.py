"""xcopa_local_<lang>: lm-eval's XCOPA format (lm_eval/tasks/xcopa/utils.py) on the local data root."""

import datasets

from lsn_exp.data import xcopa_docs

# Connectives per language exactly as lm-eval's xcopa utils define them (a test compares the two).
CONNECTIVES = {
    "et": {"cause": "sest", "effect": "seetõttu"},
    "ht": {"cause": "poukisa", "effect": "donk sa"},
    "id": {"cause": "karena", "effect": "maka"},
    "it": {"cause": "perché", "effect": "quindi"},
    "qu": {"cause": "imataq", "effect": "chaymi"},
    "sw": {"cause": "kwa sababu", "effect": "kwa hiyo"},
    "ta": {"cause": "காரணமாக", "effect": "எனவே"},
    "th": {"cause": "เพราะ", "effect": "ดังนั้น"},
    "tr": {"cause": "çünkü", "effect": "bu yüzden"},
    "vi": {"cause": "bởi vì", "effect": "vì vậy"},
    "zh": {"cause": "因为", "effect": "所以"},
}


def load_xcopa(lang: str, data_root=None, split: str = "test", **_metadata):
    """``custom_dataset``: the rows of xcopa/<lang>.<split>.jsonl, each tagged with its language."""
    return {"test": datasets.Dataset.from_list(xcopa_docs(data_root, lang, split))}


def doc_to_text(doc) -> str:
    # lm-eval drops the premise's final character (its full stop) and appends the connective
    return doc["premise"].strip()[:-1] + f" {CONNECTIVES[doc['lang']][doc['question']]}"


def convert_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def doc_to_choice(doc) -> list:
    return [convert_choice(doc["choice1"]), convert_choice(doc["choice2"])]
