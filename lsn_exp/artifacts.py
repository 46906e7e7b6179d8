"""Content-keyed artifact cache: safetensors tensors + JSON metadata, one dir per key.

The key is a hash of everything that determines the content (model identity, corpus hashes,
settings, format version). Every job of a sweep shares the cache; the first one computes under a
file lock and the others wait and load. A corrupt or mismatched entry is reported and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"


def key_of(spec: dict) -> str:
    canonical = json.dumps({"format_version": FORMAT_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CacheEntry:
    tensors: dict[str, torch.Tensor]
    meta: dict
    path: Path
    computed: bool  # False when loaded from the cache


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry_dir(self, kind: str, spec: dict) -> Path:
        return self.root / kind / key_of(spec)

    def load(self, kind: str, spec: dict) -> CacheEntry | None:
        path = self.entry_dir(kind, spec)
        if not (path / META_FILE).exists():
            return None
        try:
            meta = json.loads((path / META_FILE).read_text())
            if meta.get("key") != key_of(spec):
                raise ValueError(f"key mismatch ({meta.get('key')} != {key_of(spec)})")
            tensors = load_file(path / TENSORS_FILE)
            missing = set(meta["tensor_names"]) - set(tensors)
            if missing:
                raise ValueError(f"missing tensors {sorted(missing)}")
        except Exception as err:  # noqa: BLE001 - any damage means: recompute
            log.warning("cached %s at %s is unreadable (%s): recomputing", kind, path, err)
            return None
        return CacheEntry(tensors, meta["meta"], path, computed=False)

    def save(self, kind: str, spec: dict, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        path = self.entry_dir(kind, spec)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / TENSORS_FILE)
        (tmp / META_FILE).write_text(json.dumps(
            {"key": key_of(spec), "kind": kind, "spec": spec, "tensor_names": sorted(tensors), "meta": meta},
            indent=2, default=str))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path

    def get_or_compute(self, kind: str, spec: dict,
                       compute: Callable[[], tuple[dict[str, torch.Tensor], dict]],
                       force: bool = False) -> CacheEntry:
        path = self.entry_dir(kind, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            cached = None if force else self.load(kind, spec)
            if cached is not None:
                log.info("loaded cached %s %s", kind, path.name)
                return cached
            tensors, meta = compute()
            self.save(kind, spec, tensors, meta)
            log.info("saved %s %s", kind, path)
            return CacheEntry(tensors, meta, path, computed=True)
