"""xwinograd_local_<lang>: lm-eval's XWinograd partial scoring (lm_eval/tasks/xwinograd/utils.py) on the
local data root. "Multiple input" mode: the choices are the contexts, the target is one shared continuation."""

import datasets

from lsn_exp.data import xwinograd_docs


def load_xwinograd(lang: str, data_root=None, **_metadata):
    """``custom_dataset``: xwinograd/<code>.jsonl (sentence, option1, option2, answer) for our code ``lang``."""
    return {"test": datasets.Dataset.from_list(xwinograd_docs(data_root, lang))}


def doc_to_text(doc) -> int:
    """The index of the correct choice (multiple-input mode)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc) -> str:
    """The shared continuation: the sentence after the blank, stripped."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc) -> list:
    """The contexts: the sentence up to the blank with each option filled in."""
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + option for option in (doc["option1"], doc["option2"])]
