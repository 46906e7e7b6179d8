"""Language identification: labels restricted to the recorded languages, the id/ms rule, ceilings on real
FLORES text, and ``generate.lid`` choosing the identifier of every steering label."""

from __future__ import annotations

import pytest

from lsn_exp import data, generate, lid
from lsn_exp.errors import UserError
from lsn_exp.settings import generate_settings

PROMPTS = {"en": ["The weather today is", "Yesterday I", "Once"], "fr": ["Il était une fois", "Bonjour"],
           "ja": ["今日は"]}


@pytest.mark.parametrize("identifier", lid.IDENTIFIERS)
def test_restricted_labels_never_leave_the_set(data_root, identifier):
    texts = [p for code in ("zh", "ms", "ht") for p in lid.pieces(data_root, code, n=30)] + ["", "1234 !!", "ok"]
    labels = lid.identify(texts, lid.RECORDED, identifier)
    assert set(labels) <= {*lid.covered(identifier), lid.NO_LABEL}
    assert labels[-3] == lid.NO_LABEL  # empty text
    assert set(lid.identify(texts[:60], ["zh", "ja"], identifier)) <= {"zh", "ja", lid.NO_LABEL}


def test_steering_labels_stay_in_the_recorded_set(tiny):
    """A tiny random model babbles in many scripts; unrestricted py3langid called it tg, la, gcf, gcr..."""
    gens = generate.generate_labelled(tiny, [p for ps in PROMPTS.values() for p in ps], max_new_tokens=12,
                                      fluency=False)
    assert {g.label for g in gens} <= {*data.LANG_ORDER, lid.NO_LABEL}, [g.label for g in gens]


def test_restricted_labels_raise_the_chinese_ceiling(data_root):
    texts = lid.pieces(data_root, "zh")
    assert len(texts) == lid.PIECE_N and all(len(t) <= 3 * lid.PIECE_WORDS for t in texts)
    unrestricted = lid.ceiling(data_root, "zh", "py3langid", restricted=False)
    assert unrestricted + 0.03 < lid.ceiling(data_root, "zh", "py3langid")  # wuu/yue are not recorded languages
    relabelled = generate.relabelled([generate.Generation("p", t, "wuu") for t in texts], "py3langid")
    assert generate.share_in(relabelled, "zh") == lid.ceiling(data_root, "zh")


def test_indonesian_and_malay_count_for_each_other_in_share_in():
    gens = [generate.Generation("p", "Saya pergi ke pasar", label, 0.0) for label in ("id", "ms", "jv", "en")]
    assert lid.counts_as("ms", "id") and lid.counts_as("id", "ms") and not lid.counts_as("zh", "ja")
    assert generate.share_in(gens, "id") == generate.share_in(gens, "ms") == 0.5
    assert generate.share_in(gens, "en") == 0.25


def test_ceilings_by_identifier_and_the_pair_rule(data_root):
    found = lid.ceilings(data_root, ["id", "ms", "ht", "th"], "lingua")
    assert found["ht"] == {"ceiling": None, "n": lid.PIECE_N}  # lingua has no Haitian
    assert all(found[t]["ceiling"] >= 0.95 for t in ("id", "ms", "th"))
    strict_ms = sum(label == "ms" for label in lid.identify(lid.pieces(data_root, "ms"))) / lid.PIECE_N
    assert strict_ms < 0.9 < lid.ceiling(data_root, "ms")  # the pair rule lifts the py3langid ms ceiling
    both = lid.pieces(data_root, "fr", n=40)
    assert 0.9 <= lid.agreement(both) <= 1.0


def test_generate_lid_chooses_the_identifier_of_steering_labels(tiny):
    settings = generate_settings({"lid": "lingua", "max_new_tokens": 12})
    assert settings.lid == "lingua" and generate_settings({}).lid == "py3langid"
    _, rows = generate.steering(tiny, PROMPTS, "fr", settings)
    texts = [r[5] for r in rows]  # patched text, then its label
    assert [r[6] for r in rows] == lid.identify(texts, lid.RECORDED, "lingua")
    assert [r[6] for r in rows] != lid.identify(texts, lid.RECORDED, "py3langid")
    with pytest.raises(UserError, match="generate.lid=lingua cannot label ht"):
        generate.steering(tiny, PROMPTS, "ht", settings)


def test_an_unknown_identifier_is_one_line():
    with pytest.raises(UserError, match="generate.lid=cld9 is not allowed: use one of py3langid, lingua"):
        generate_settings({"lid": "cld9"})
    with pytest.raises(UserError, match="generate.lid=cld9 is not allowed"):
        lid.identify(["text"], identifier="cld9")


def test_mt_language_share_and_rows_use_the_same_labels(data_root):
    """The FLORES MT task's lang_share and downstream's MT rows: restricted py3langid and the id/ms rule."""
    import importlib.util

    from lsn_exp import downstream, lmeval, metrics

    spec = importlib.util.spec_from_file_location("flores_mt_utils", lmeval.TASKS_DIR / "flores_mt" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    wuu = next(t for t in lid.pieces(data_root, "zh") if lid.identify([t], None)[0] == "wuu")  # unrestricted
    malay = next(t for t in lid.pieces(data_root, "ms") if lid.identify([t])[0] == "ms")
    for text, lang in ((wuu, "zh"), (malay, "id")):
        doc = {"target": text, "lang": lang, "bleu_tokenize": metrics.bleu_tokenizer(lang)}
        assert utils.process_results(doc, [text])["lang_share"] == 1.0, (text, lang)
    before = downstream.DocOutputs(["0", "1"], {}, {"predictions": [wuu, ""], "references": ["r0", "r1"]})
    after = downstream.DocOutputs(["0", "1"], {}, {"predictions": [malay, wuu], "references": ["r0", "r1"]})
    assert [r[4::2] for r in downstream.mt_rows("flores_mt_zh", after, before)] == [["zh", "ms"], ["-", "zh"]]
