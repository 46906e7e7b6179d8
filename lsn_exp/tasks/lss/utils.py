"""Documents of the lss_<source> tasks, from the local mLAMA copy (prompts and sampling: lsn_exp/data.py)."""

import datasets

from lsn_exp.data import lss_docs


def load_lss(source: str, n_facts, data_root=None, seed=0, exclude_n_facts=None, prompt_prefix="", skip_n_facts=0,
             **_metadata):
    """``custom_dataset``: lm-eval passes the task metadata (TaskManager(metadata=...)) and dataset_kwargs.

    data_root None: LSN_DATA, else ../shared/data beside the repo. ``exclude_n_facts``: hold out the reporting
    sample of that size (a factor search's sample); ``skip_n_facts``: leave out the draw's first facts (another
    block's). ``prompt_prefix``: a prompt baseline's text before each prompt.
    """
    docs = lss_docs(data_root, source, n_facts, int(seed), exclude_n_facts, prompt_prefix or "", skip_n_facts)
    return {"test": datasets.Dataset.from_list(docs)}
