"""Every dataset reader: the language registry, the data root, FLORES-200, XCOPA, XWinograd and mLAMA.

The task ``utils.py`` files under ``lsn_exp/tasks/`` import only this module and ``lsn_exp.lid`` (language labels,
built on this one): lm-eval style, a task is data plus small pure functions. Readers return plain rows; a missing
file or an offline hub is one UserError.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, REPO_ROOT
from lsn_exp.errors import UserError

DATA_ENV = "LSN_DATA"
DEFAULT_LOCAL_ROOT = REPO_ROOT.parent / "shared" / "data"
FLORES_HUB_ID = "openlanguagedata/flores_plus"  # FLORES+ (v2): close to, not byte-equal with, v1
MLAMA_HUB_ID = "inayarhmns/MLAMA-dod-185"  # the paper's set (hub only; LSS reads the local copy)
TRUTHY = ("1", "true", "yes", "on")
NO_SPACE_LANGS = ("ja", "zh", "th")  # written without spaces between words
PAPER_SEP = " "  # the paper's code puts one space between prompt and object in every language (lss_paper)


# --- languages -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Language:
    code: str
    index: int  # the paper's order (languages.tsv idx)
    name: str
    flores: str
    xcopa: str | None  # each dataset's code for the language; None where the dataset lacks it
    xwinograd: str | None
    mlama: str | None
    include: str | None


@cache
def language_registry() -> dict[str, Language]:
    """All languages with a ``conf/lang/<code>.yaml``, by short code, in the paper's order."""
    langs = [Language(**OmegaConf.to_container(OmegaConf.load(p))) for p in (CONF_DIR / "lang").glob("*.yaml")]
    return {lang.code: lang for lang in sorted(langs, key=lambda lang: lang.index)}


def languages(codes) -> list[Language]:
    registry = language_registry()
    unknown = [c for c in codes if c not in registry]
    if unknown:
        raise UserError(f"unknown language code(s) {unknown}; known: {' '.join(registry)}")
    return [registry[c] for c in codes]


def covered(field: str) -> tuple[str, ...]:
    """Our codes of the languages a dataset covers (``field``: xcopa, xwinograd, mlama, include)."""
    return tuple(code for code, lang in language_registry().items() if getattr(lang, field))


LANG_ORDER = tuple(language_registry())  # the 18 languages in the paper's order
LSS_LANGS = covered("mlama")  # the 15 languages of the parallel mLAMA facts


# --- the data root ---------------------------------------------------------------------------------------

def resolve_root(setting=None) -> Path | None:
    """The local data root: ``setting`` (data.root), else $LSN_DATA, else ../shared/data beside the repo;
    None when there is none (readers then go to the HF hub where they can)."""
    setting = str(setting) if setting else os.environ.get(DATA_ENV)
    if setting:
        root = Path(setting).expanduser()
        if not root.is_dir():
            raise UserError(f"data root {root} does not exist: set data.root=DIR or {DATA_ENV}=DIR")
        return root
    return DEFAULT_LOCAL_ROOT if DEFAULT_LOCAL_ROOT.is_dir() else None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set to a true value (1, true, yes, on), as huggingface_hub reads it."""
    return any(os.environ.get(var, "").strip().lower() in TRUTHY for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def require_hub(what: str) -> None:
    if hub_offline():
        raise UserError(f"no local copy of {what} and the HF hub is offline: "
                        f"set data.root=DIR or {DATA_ENV}=DIR (a copy like ../shared/data)")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"{path} is missing: set data.root=DIR or {DATA_ENV}=DIR (a copy like ../shared/data, "
                        f"see its README)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hub_rows(what: str, path: str, name: str, split: str) -> list[dict]:
    require_hub(what)
    from datasets import load_dataset

    return list(load_dataset(path, name, split=split))


# --- FLORES-200 ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextFile:
    """Sentences of one corpus file; ``path`` is None when they came from the hub."""

    sentences: list[str]
    path: Path | None


def flores(root: Path | None, lang: Language, split: str) -> TextFile:
    """FLORES-200 ``dev`` (997) or ``devtest`` (1012) sentences, line-aligned across languages."""
    if root is not None:
        path = flores_path(root, lang, split)
        if not path.exists():
            raise UserError(f"{path} is missing: data.root must hold flores200/{split}/<code>.txt")
        return TextFile(path.read_text(encoding="utf-8").splitlines(), path)
    rows = _hub_rows("FLORES-200", FLORES_HUB_ID, lang.flores, split)
    return TextFile([r["text"] for r in rows], None)


def flores_path(root: Path, lang: Language, split: str) -> Path:
    return root / "flores200" / split / f"{lang.flores}.txt"


# English -> X prompts. "untargeted" names only the source language, so any move toward X comes from the
# patch; "targeted" names X. The model continues after the final ":".
MT_PROMPTS = {
    "untargeted": "Translate the following English sentence.\nEnglish: {source}\nTranslation:",
    "targeted": "Translate the following English sentence into {target_name}.\nEnglish: {source}\n{target_name}:",
}


def flores_mt_docs(data_root, lang: str, split: str = "devtest", prompt: str = "untargeted") -> list[dict]:
    """English -> ``lang`` documents: source, target and the rendered prompt."""
    if lang == "en" or lang not in LANG_ORDER:
        raise UserError(f"flores_mt translates English into one of {' '.join(LANG_ORDER[1:])}, not {lang}")
    if prompt not in MT_PROMPTS:
        raise UserError(f"mt_prompt={prompt} is not allowed: use one of {', '.join(MT_PROMPTS)}")
    root, target = resolve_root(data_root), languages([lang])[0]
    sources = flores(root, languages(["en"])[0], split).sentences
    targets = flores(root, target, split).sentences
    assert len(sources) == len(targets), "FLORES files must be line-aligned"
    return [{"id": i, "source": s, "target": t, "lang": lang,
             "prompt": MT_PROMPTS[prompt].format(source=s, target_name=target.name)}
            for i, (s, t) in enumerate(zip(sources, targets))]


def flores_ppl_docs(data_root, lang: str, split: str = "devtest") -> list[dict]:
    sentences = flores(resolve_root(data_root), languages([lang])[0], split).sentences
    return [{"id": i, "text": s, "lang": lang} for i, s in enumerate(sentences)]


def flores_prompts(root: Path | None, lang: str, n: int, words: int, first: int = 0) -> list[str]:
    """Generation prompts in ``lang``: the opening ``words`` words of FLORES devtest sentences first..first+n-1
    (languages written without spaces take 3 characters a word)."""
    sentences = flores(root, languages([lang])[0], "devtest").sentences[first: first + n]
    if lang in NO_SPACE_LANGS:
        return [s[: 3 * words] for s in sentences]
    return [" ".join(s.split()[:words]) for s in sentences]


def prompts_from_file(path) -> dict[str, list[str]]:
    """A YAML file {lang: [prompt, ...]}."""
    loaded = OmegaConf.to_container(OmegaConf.load(Path(path).expanduser()))
    if not isinstance(loaded, dict) or not all(isinstance(v, list) for v in loaded.values()):
        raise UserError(f"{path} is not a YAML mapping {{lang: [prompt, ...]}}")
    return {str(lang): [str(p) for p in prompts] for lang, prompts in loaded.items()}


PROMPT_MODES = ("none", "instruction", "priming")


def prompt_prefix(mode: str, target: str, root: Path | None, sentence: int = 0) -> str:
    """What a prompt baseline puts before every prompt to steer toward ``target`` with the prompt alone:
    instruction (for instruct models) names the language; priming (for base models) is one FLORES dev sentence
    in the target language, then a newline."""
    if mode not in PROMPT_MODES:
        raise UserError(f"prompt.mode={mode} is not allowed: use one of {', '.join(PROMPT_MODES)}")
    if mode == "none":
        return ""
    lang = languages([target])[0]
    if mode == "instruction":
        return f"Answer in {lang.name}.\n"
    return flores(root, lang, "dev").sentences[sentence] + "\n"


# --- XCOPA and XWinograd ---------------------------------------------------------------------------------

def _dataset_code(field: str, lang: str, dataset: str) -> str:
    code = getattr(languages([lang])[0], field)
    if not code:
        raise UserError(f"{dataset} has no {lang}: it covers {' '.join(covered(field))}")
    return code


def xcopa_docs(data_root, lang: str, split: str = "test") -> list[dict]:
    """XCOPA rows of our language ``lang`` (xcopa/<code>.<split>.jsonl), each with ``lang`` added."""
    code, root = _dataset_code("xcopa", lang, "XCOPA"), resolve_root(data_root)
    rows = (read_jsonl(root / "xcopa" / f"{code}.{split}.jsonl") if root is not None else
            _hub_rows("XCOPA", "cambridgeltl/xcopa", code, "validation" if split == "val" else split))
    return [{**row, "lang": lang} for row in rows]


XWINOGRAD_FIELDS = ("sentence", "option1", "option2", "answer")


def xwinograd_docs(data_root, lang: str) -> list[dict]:
    """XWinograd rows (sentence with "_", option1, option2, answer) of our language ``lang`` (ja -> jp)."""
    code, root = _dataset_code("xwinograd", lang, "XWinograd"), resolve_root(data_root)
    rows = (read_jsonl(root / "xwinograd" / f"{code}.jsonl") if root is not None else
            _hub_rows("XWinograd", "Muennighoff/xwinograd", code, "test"))
    return [{**{k: row[k] for k in XWINOGRAD_FIELDS}, "lang": lang} for row in rows]


# --- mLAMA: parallel facts, prompts, samples -------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    """One mLAMA fact in every LSS language."""

    fact_id: str  # "<predicate_id>:<lineid>", e.g. "P17:35"
    relation: str
    prompts: dict[str, str]  # lang -> source template, [X] filled, cut just before [Y], no trailing space
    seps: dict[str, str]  # lang -> what goes between that prompt and an object: " " or ""
    objects: dict[str, str]  # lang -> object label

    def continuation(self, source: str, lang: str) -> str:
        """The object in ``lang`` as a continuation of the ``source`` prompt."""
        return self.seps[source] + self.objects[lang]

    def paper_continuation(self, lang: str) -> str:
        """The object in ``lang`` as the paper's code continues any prompt: after one space, in every language
        (tauimbz/lang-task-neuron intervention_dod.py ``calculate_logprob``: ``prompt + " " + continuation``)."""
        return PAPER_SEP + self.objects[lang]


@dataclass(frozen=True)
class MlamaFacts:
    facts: list[Fact]  # usable in every language, in file order (relation, lineid)
    excluded: dict[str, int]  # reason -> number of facts (a fact counts once, under its first reason)
    excluded_by_lang: dict[str, dict[str, int]]  # lang -> reason -> facts
    files: list[Path]

    def summary(self) -> dict:
        return {"facts_usable": len(self.facts), "excluded": self.excluded, "excluded_by_lang": self.excluded_by_lang}


def mlama_root(setting) -> Path:
    """The data root LSS reads mLAMA from: local only (the hub set is not wired)."""
    root = resolve_root(setting)
    if root is None:
        require_hub("mLAMA")
        raise UserError(f"LSS reads mLAMA from a local data root (mlama/); the hub set {MLAMA_HUB_ID} is not "
                        f"wired: set data.root=DIR or {DATA_ENV}=DIR")
    return root


def build_prompt(template: str, subject: str, no_space: bool) -> tuple[str, str] | str:
    """(prompt, sep) for a template with one [X] and one [Y], or the reason it cannot give one.

    The prompt is the template up to [Y] with [X] filled; trailing whitespace moves out of the prompt and
    becomes the separator " " (lm-eval scores word-boundary spaces as part of the continuation). Languages
    written without spaces get sep "" and keep no space before the object.
    """
    subject = subject.strip()
    if template.count("[X]") != 1 or template.count("[Y]") != 1:
        return "template_placeholders"
    if not subject:
        return "empty_subject"
    if template.index("[Y]") < template.index("[X]"):
        return "object_before_subject"  # a prompt cut at [Y] would not name the subject
    head = template[: template.index("[Y]")].replace("[X]", subject)
    prompt = head.rstrip()
    if not prompt:
        return "empty_prompt"
    return prompt, "" if no_space or prompt == head else " "


def _exclusion(row: dict | None, first: dict, templates: dict, relation: str, lang: str):
    """(prompt, sep, object) of one language's row of a fact, or the reason it is unusable."""
    if row is None:
        return "not_in_all_languages"
    if row["sub_uri"] != first["sub_uri"] or row["obj_uri"] != first["obj_uri"]:
        return "misaligned_uris"
    if relation not in templates:
        return "missing_template"
    if not row["obj_label"].strip():
        return "empty_object"
    built = build_prompt(templates[relation], row["sub_label"], lang in NO_SPACE_LANGS)
    return built if isinstance(built, str) else (*built, row["obj_label"].strip())


@lru_cache(maxsize=4)
def read_mlama(root: Path, langs: tuple[str, ...] = LSS_LANGS) -> MlamaFacts:
    """Join ``mlama/parallel15/{lang}.jsonl`` on (predicate_id, lineid); build every language's prompt."""
    files, templates, rows = [], {}, {}
    for lang in languages(langs):
        files += [Path(root) / "mlama" / "templates" / f"{lang.mlama}.jsonl",
                  Path(root) / "mlama" / "parallel15" / f"{lang.mlama}.jsonl"]
        templates[lang.code] = {r["relation"]: r["template"] for r in read_jsonl(files[-2])}
        rows[lang.code] = {(r["predicate_id"], int(r["lineid"])): r for r in read_jsonl(files[-1])}
    keys = list(rows[langs[0]])  # file order of the first language: relation, then lineid
    excluded: Counter = Counter()
    by_lang: dict[str, Counter] = defaultdict(Counter)
    facts = []
    for relation, lineid in keys:
        built = {lang: _exclusion(rows[lang].get((relation, lineid)), rows[langs[0]][(relation, lineid)],
                                  templates[lang], relation, lang) for lang in langs}
        reasons = {lang: b for lang, b in built.items() if isinstance(b, str)}
        for lang, reason in reasons.items():
            by_lang[lang][reason] += 1
        if reasons:
            excluded[next(iter(reasons.values()))] += 1
            continue
        facts.append(Fact(f"{relation}:{lineid}", relation, *({lang: b[i] for lang, b in built.items()}
                                                              for i in range(3))))
    for lang in langs[1:]:  # facts present in some language but not in the first one
        extra = len(set(rows[lang]) - set(keys))
        if extra:
            by_lang[lang]["not_in_all_languages"] += extra
            excluded["not_in_all_languages"] += extra
    return MlamaFacts(facts, dict(excluded), {k: dict(v) for k, v in by_lang.items()}, files)


def _round_robin(facts: list[Fact], n: int, seed: int) -> list[Fact]:
    """``n`` facts: shuffle each relation with ``seed``, then one per relation in turn (relations in a seeded
    order); the result keeps file order."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, fact in enumerate(facts):
        groups[fact.relation].append(i)
    relations = sorted(groups)
    rng.shuffle(relations)
    for relation in relations:
        rng.shuffle(groups[relation])
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        picked += [groups[r][depth] for r in relations if depth < len(groups[r])][: n - len(picked)]
        depth += 1
    return [facts[i] for i in sorted(picked)]


def sample_facts(facts: list[Fact], n_facts: int | str | None, seed: int,
                 exclude_n_facts: int | str | None = None, skip_n_facts: int = 0) -> list[Fact]:
    """``n_facts`` facts spread over relations (``_round_robin``); ``all``/None keeps every fact.

    ``exclude_n_facts``: first remove the sample this function gives for that size and seed (the reporting
    sample), so a factor search never scores a fact it is later reported on. ``skip_n_facts``: leave out the
    first that many facts of the draw (another block's: the draws of one seed are nested), so a compare run's
    final sample shares no fact with its search sample.
    """
    if skip_n_facts:
        skipped = {f.fact_id for f in sample_facts(facts, skip_n_facts, seed, exclude_n_facts)}
        drawn = sample_facts(facts, int(n_facts) + skip_n_facts, seed, exclude_n_facts)
        return [f for f in drawn if f.fact_id not in skipped]
    if exclude_n_facts is not None:
        held = {f.fact_id for f in sample_facts(facts, exclude_n_facts, seed)}
        facts = [f for f in facts if f.fact_id not in held]
        if not facts:
            raise UserError(f"no facts are left for the search once the {exclude_n_facts}-fact reporting sample is "
                            f"held out: lower lss.n_facts or lss.search.n_facts")
    if n_facts is None or str(n_facts).lower() == "all":
        return list(facts)
    try:
        n = int(n_facts)
    except (TypeError, ValueError):
        raise UserError(f"lss.n_facts={n_facts!r} is not a number or 'all'") from None
    if not 0 < n <= len(facts):
        raise UserError(f"lss.n_facts={n} is out of range: use 1..{len(facts)} or 'all'"
                        + (f" ({len(facts)} facts are left beside the reporting sample)" if exclude_n_facts else ""))
    return _round_robin(facts, n, seed)


def lss_docs(data_root, source: str, n_facts: int | str | None, seed: int = 0,
             exclude_n_facts: int | str | None = None, prompt_prefix: str = "", skip_n_facts: int = 0) -> list[dict]:
    """The documents of task ``lss_<source>``: one per sampled fact, choices = the object in every language
    (``paper_choices``: in the paper's format); ``prompt_prefix`` goes before every prompt (a prompt baseline)."""
    if source not in LSS_LANGS:
        raise UserError(f"lss source {source} is not an LSS language: use one of {' '.join(LSS_LANGS)}")
    sample = sample_facts(read_mlama(mlama_root(data_root)).facts, n_facts, seed, exclude_n_facts, int(skip_n_facts))
    return [{"fact_id": f.fact_id, "relation": f.relation, "source": source,
             "prompt": prompt_prefix + f.prompts[source],
             "choices": [f.continuation(source, lang) for lang in LSS_LANGS], "langs": list(LSS_LANGS),
             "paper_choices": [f.paper_continuation(lang) for lang in LSS_LANGS],
             "source_index": LSS_LANGS.index(source)} for f in sample]
