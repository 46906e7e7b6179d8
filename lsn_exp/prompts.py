"""Generation prompts: two domains, and three disjoint blocks of each (reported, searched, final).

Domains (``generate.domain``, ``compare.domains``):
- ``news``: openings of FLORES-200 devtest sentences (news, travel and wiki text);
- ``everyday``: openings of everyday common-sense sentences: COPA premises (XCOPA's own languages; English from
  XCOPA's translate-test into English of the Italian rows), else XWinograd sentences (fr, ja, pt, ru).
An opening is a sentence's first ``words`` words (3 characters a word where words are not spaced); duplicate
openings (XWinograd's twin sentences) are kept once.

A compare run judges a method on three samples of every domain's pool per source, never overlapping: the
reported prompts (from ``generate.first_sentence``), the search prompts (the pool's last ``n_search``) and the
final prompts (the ``n_final`` before them: a fresh sample on which the searched finalists are re-scored, so a
searched method is not judged by the best of its own noisy evaluations). Prompts written in the config or a file
are split the same way, or refused when there are too few.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from lsn_exp import data
from lsn_exp.errors import UserError

DOMAINS = ("news", "everyday")
GIVEN = "given"  # the domain name of prompts written in the config or a file
COPA_ENGLISH_FROM = "it"  # XCOPA translate-test file whose English premises stand for English COPA


def opening(sentence: str, lang: str, words: int) -> str:
    """The first ``words`` words of ``sentence`` (3 characters a word for languages written without spaces)."""
    if lang in data.NO_SPACE_LANGS:
        return sentence.strip()[: 3 * words]
    return " ".join(sentence.split()[:words])


def everyday_sentences(root: Path | None, lang: str) -> list[str]:
    """Everyday sentences in ``lang``: XCOPA premises (val then test), English COPA premises, else XWinograd."""
    if lang in data.covered("xcopa"):
        return [row["premise"] for split in ("val", "test") for row in data.xcopa_docs(root, lang, split)]
    if lang == "en" and root is not None:
        return [row["premise"] for split in ("val", "test") for row in data.read_jsonl(
            root / "xcopa" / "translate-test" / f"{COPA_ENGLISH_FROM}.{split}.jsonl")]
    if lang in data.covered("xwinograd"):
        return [row["sentence"].replace("_", row[f"option{row['answer']}"]) for row in data.xwinograd_docs(root, lang)]
    have = sorted({*data.covered("xcopa"), *data.covered("xwinograd"), "en"})
    raise UserError(f"the everyday prompt domain has no {lang} sentences: it covers {' '.join(have)}; "
                    f"drop {lang} from generate.sources or use generate.domain=news")


@lru_cache(maxsize=64)
def pool(root: Path | None, domain: str, lang: str, words: int) -> tuple[str, ...]:
    """Every distinct opening of ``domain`` in ``lang``, in file order."""
    if domain == "news":
        sentences = data.flores(root, data.languages([lang])[0], "devtest").sentences
    elif domain == "everyday":
        sentences = everyday_sentences(root, lang)
    else:
        raise UserError(f"prompt domain {domain!r} is not known: use one of {', '.join(DOMAINS)}")
    return tuple(dict.fromkeys(o for o in (opening(s, lang, words) for s in sentences) if o))


@dataclass(frozen=True)
class PromptSplit:
    """source -> prompts of each block; the blocks share no prompt."""

    domain: str
    report: dict[str, list[str]]
    search: dict[str, list[str]]
    final: dict[str, list[str]]


def split(pools: dict[str, list[str]], domain: str, first: int, n_report: int | None, n_search: int,
          n_final: int) -> PromptSplit:
    """The three blocks of every source's pool: reported ``pool[first:first + n_report]`` (all before the held-out
    blocks when ``n_report`` is None), search the last ``n_search``, final the ``n_final`` before them."""
    report, search, final = {}, {}, {}
    for lang, prompts in pools.items():
        held = n_search + n_final
        stop = len(prompts) - held if n_report is None else first + n_report
        if stop > len(prompts) - held or stop <= first:
            raise UserError(f"the {domain} prompts in {lang} ({len(prompts)}) cannot give {n_report or 'any'} "
                            f"reported prompts from #{first} and {n_search} search + {n_final} final prompts "
                            f"that none of them repeats: lower compare.n_prompts / compare.search.n_prompts / "
                            f"compare.final.n_prompts, or give more prompts")
        report[lang] = list(prompts[first:stop])
        final[lang] = list(prompts[len(prompts) - held: len(prompts) - n_search])
        search[lang] = list(prompts[len(prompts) - n_search:])
    return PromptSplit(domain, report, search, final)


def prompt_split(settings, root: Path | None, domain: str | None = None, n_report: int | None = None,
                 n_search: int = 0, n_final: int = 0) -> PromptSplit:
    """The blocks of ``domain`` (default ``settings.domain``) for ``settings.sources`` (GenerateSettings);
    prompts written in the config or a file are their own domain and are split the same way."""
    given = settings.prompts if settings.prompts is not None else (
        data.prompts_from_file(settings.prompts_file) if settings.prompts_file is not None else None)
    if given is not None:
        return split(given, GIVEN, 0, None, n_search, n_final)
    domain = domain or settings.domain
    pools = {lang: list(pool(root, domain, lang, settings.prompt_words)) for lang in settings.sources}
    return split(pools, domain, settings.first_sentence, n_report or settings.n_prompts, n_search, n_final)


def check_blocks(settings, root: Path | None, compare) -> None:
    """A compare run's prompt blocks (``compare``: settings.CompareSettings) exist and do not overlap; read from
    the local data only (offline, before any model loads). The sizes themselves are settings.compare_settings'."""
    if root is None and settings.prompts is None and settings.prompts_file is None:
        return
    for domain in dict.fromkeys([*compare.domains, compare.search.domain]):
        prompt_split(replace(settings, n_prompts=compare.n_prompts), root, domain, None, compare.search.n_prompts,
                     compare.n_final)
