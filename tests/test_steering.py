"""Steering on the real Gemma-3-270M: pmax on the LAPE neurons moves free generation to the target."""

from __future__ import annotations

import pytest

from lsn_exp import REPO_ROOT, data, generate, identify
from lsn_exp.patch import Patch
from lsn_exp.specs import PatchSpec

NEUTRAL = data.prompts_from_file(REPO_ROOT / "scripts" / "neutral_prompts.yaml")["en"]


@pytest.mark.slow
def test_pmax_on_lape_neurons_switches_the_language_of_free_generation():
    handle, neurons = identify.load_with_neurons("gemma3_270m")  # records 18 languages once (cached)
    targets = [code for code in neurons.languages if code != "en"]
    unpatched = generate.generate_labelled(handle, NEUTRAL, max_new_tokens=25, fluency=False)
    patched = {t: generate.generate_labelled(handle, NEUTRAL, max_new_tokens=25, fluency=False,
                                             patch=Patch(handle, neurons, PatchSpec(t, op="set", source="pmax")))
               for t in targets}
    hits_before = {t: sum(g.label == t for g in unpatched) for t in targets}
    hits_after = {t: sum(g.label == t for g in gens) for t, gens in patched.items()}
    report = f"unpatched {hits_before}\npatched {hits_after}"
    assert all(n <= 1 for n in hits_before.values()), report
    assert max(hits_after.values()) >= 6, report
    assert sum(hits_after.values()) >= 10, report
