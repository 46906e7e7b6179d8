"""Datasets: the language registry and readers for the local data root (HF hub when absent)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, REPO_ROOT
from lsn_exp.errors import UserError

DATA_ENV = "LSN_DATA"
DEFAULT_LOCAL_ROOT = REPO_ROOT.parent / "shared" / "data"
FLORES_HUB_ID = "openlanguagedata/flores_plus"  # FLORES+ (v2): close to, not byte-equal with, v1


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    flores: str
    xcopa: str | None
    xwinograd: str | None
    mlama: str | None
    include: str | None


@cache
def language_registry() -> dict[str, Language]:
    """All languages with a ``conf/lang/<code>.yaml``, by short code."""
    langs = {}
    for path in sorted((CONF_DIR / "lang").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        langs[node["code"]] = Language(**node)
    return langs


def languages(codes) -> list[Language]:
    registry = language_registry()
    unknown = [c for c in codes if c not in registry]
    if unknown:
        raise UserError(f"unknown language code(s) {unknown}; known: {' '.join(registry)}")
    return [registry[c] for c in codes]


def resolve_root(setting: str | None) -> Path | None:
    """The local data root, or None to read from the HF hub."""
    if setting:
        root = Path(setting).expanduser()
        if not root.is_dir():
            raise UserError(f"data root {root} does not exist: set data.root=DIR or {DATA_ENV}=DIR")
        return root
    if DEFAULT_LOCAL_ROOT.is_dir():
        return DEFAULT_LOCAL_ROOT
    return None


def require_hub(what: str) -> None:
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        raise UserError(f"no local copy of {what} and the HF hub is offline: "
                        f"set data.root=DIR or {DATA_ENV}=DIR (a copy like ../shared/data)")


@dataclass(frozen=True)
class TextFile:
    """Sentences of one corpus file; ``path`` is None when they came from the hub."""

    sentences: list[str]
    path: Path | None


def flores(root: Path | None, lang: Language, split: str) -> TextFile:
    """FLORES-200 ``dev`` (997) or ``devtest`` (1012) sentences, line-aligned across languages."""
    if root is not None:
        path = root / "flores200" / split / f"{lang.flores}.txt"
        if not path.exists():
            raise UserError(f"{path} is missing: data.root must hold flores200/{split}/<code>.txt")
        return TextFile(path.read_text(encoding="utf-8").splitlines(), path)
    require_hub("FLORES-200")
    from datasets import load_dataset

    rows = load_dataset(FLORES_HUB_ID, lang.flores, split=split)
    return TextFile([r["text"] for r in rows], None)
