"""Content-keyed cache: safetensors tensors + JSON metadata, one dir per key.

The key is a hash of everything that determines the content (model identity, corpus hashes,
settings, format version). Every job of a sweep shares the cache; the first one computes under a
file lock and the others wait and load. An entry is written to a temp dir, fsynced and renamed, and
its meta carries the sha256 of its tensor file: a truncated, bit-flipped or mismatched entry is
reported in one line and recomputed. Every computation is appended to ``ledger.jsonl`` (kind, key,
pid, host, seconds), so a sweep can be audited for work done twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import safetensors.torch
import torch
from filelock import FileLock

from lsn_exp.errors import UserError
from lsn_exp.files import store_dir, write_text_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
LEDGER_FILE = "ledger.jsonl"

Computed = tuple[dict[str, torch.Tensor], dict]


def key_of(spec: dict) -> str:
    canonical = json.dumps({"format_version": FORMAT_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def fsync_path(path: Path) -> None:
    """Flush a file's (or a dir's entries') data to disk: a rename after it is then durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CacheEntry:
    tensors: dict[str, torch.Tensor]
    meta: dict
    path: Path
    computed: bool  # False when loaded from the cache


class DamagedEntry(ValueError):
    """A cache entry that exists but cannot be trusted."""


class CacheStore:
    """One model's cache: ``root``/<kind>/<key>/ (tensors + meta) and the ledger."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tally: Counter = Counter()  # (kind, "loaded" | "computed") -> entries, for this process

    def summary(self) -> list[str]:
        """One line per cache kind this process used: entries loaded and computed (each entry is logged at DEBUG)."""
        kinds = dict.fromkeys(kind for kind, _ in self.tally)
        return [f"cache {kind}: {self.tally[kind, 'loaded']} loaded, {self.tally[kind, 'computed']} computed "
                f"({self.root / kind})" for kind in kinds]

    @classmethod
    def for_model(cls, model_name: str, cache_dir: str | None = None) -> CacheStore:
        """The store of the model named ``model_name`` (conf/model/<name>.yaml) under the cache root."""
        return cls(store_dir(model_name, cache_dir))

    def keys(self, kind: str) -> list[str]:
        """The keys of every complete entry of ``kind``, oldest first."""
        entries = [p for p in (self.root / kind).glob("*") if (p / META_FILE).is_file()]
        return [p.name for p in sorted(entries, key=lambda p: p.stat().st_mtime)]

    def read(self, kind: str, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """Entry ``key`` of ``kind`` as (its stored record: key, kind, spec, meta; its tensors), checksum checked."""
        path = self.root / kind / key
        if not (path / META_FILE).is_file():
            raise UserError(f"no {kind} entry {key} under {self.root}")
        try:
            return self.read_entry(path, key)
        except DamagedEntry as err:
            raise UserError(f"{kind} entry {path} is damaged ({err}): delete it and recompute") from None

    def record(self, kind: str, key: str) -> dict:
        """Entry ``key`` of ``kind``'s stored record without its tensors (key, kind, spec, meta)."""
        path = self.root / kind / key / META_FILE
        if not path.is_file():
            raise UserError(f"no {kind} entry {key} under {self.root}")
        return json.loads(path.read_text())

    def entry_dir(self, kind: str, spec: dict) -> Path:
        return self.root / kind / key_of(spec)

    def load(self, kind: str, spec: dict) -> CacheEntry | None:
        path = self.entry_dir(kind, spec)
        if not path.exists():
            return None
        try:
            stored, tensors = self.read_entry(path, key_of(spec))
        except Exception as err:  # noqa: BLE001 - any damage means: recompute
            log.warning("cached %s %s is damaged (%s): recomputing", kind, path, err)
            return None
        return CacheEntry(tensors, stored["meta"], path, computed=False)

    @staticmethod
    def read_entry(path: Path, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """An entry's stored meta and tensors, its file read once and checked against its sha256; raises on
        any damage. An entry written before checksums existed adopts one."""
        stored = json.loads((path / META_FILE).read_text())
        if stored.get("key") != key:
            raise DamagedEntry(f"key mismatch ({stored.get('key')} != {key})")
        blob = (path / TENSORS_FILE).read_bytes()
        actual = hashlib.sha256(blob).hexdigest()
        expected = stored.get("sha256")
        if expected is None:
            stored["sha256"] = actual
            write_text_atomic(path / META_FILE, json.dumps(stored, indent=2, default=str))
        elif actual != expected:
            raise DamagedEntry(f"{TENSORS_FILE}: sha256 {actual[:12]} != recorded {expected[:12]}")
        tensors = safetensors.torch.load(blob)
        missing = set(stored["tensor_names"]) - set(tensors)
        if missing:
            raise DamagedEntry(f"missing tensors {sorted(missing)}")
        return stored, tensors

    def save(self, kind: str, spec: dict, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        path = self.entry_dir(kind, spec)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
        try:
            with open(tmp / TENSORS_FILE, "wb") as f:  # a full disk raises its OSError here
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            write_text_atomic(tmp / META_FILE, json.dumps(
                {"key": key_of(spec), "kind": kind, "spec": spec, "tensor_names": sorted(tensors),
                 "sha256": hashlib.sha256(blob).hexdigest(), "meta": meta}, indent=2, default=str))
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            fsync_path(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def get_or_compute(self, kind: str, spec: dict, compute: Callable[[], Computed],
                       force: bool = False) -> CacheEntry:
        return self.get_or_compute_many(kind, {"": spec}, lambda names: {"": compute()}, force)[""]

    def get_or_compute_many(self, kind: str, specs: dict[Hashable, dict],
                            compute: Callable[[list], dict[Hashable, Computed]],
                            force: bool = False) -> dict[Hashable, CacheEntry]:
        """Entries of ``specs`` (name -> spec): those cached are loaded, the rest computed in one call of
        ``compute(missing names)`` (a name it leaves out is left out of the answer). All their locks are held
        meanwhile, taken in key order so that jobs needing overlapping sets cannot deadlock: a job that waited
        loads what the first one saved."""
        paths = {name: self.entry_dir(kind, spec) for name, spec in specs.items()}
        (self.root / kind).mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as locks:
            for path in sorted(set(paths.values())):
                locks.enter_context(FileLock(f"{path}.lock"))
                for stale in path.parent.glob(f"{path.name}.tmp*"):  # left by a killed writer: we hold its lock
                    shutil.rmtree(stale, ignore_errors=True)
            entries = {} if force else {name: self.load(kind, spec) for name, spec in specs.items()}
            entries = {name: entry for name, entry in entries.items() if entry is not None}
            missing = [name for name in specs if name not in entries]
            for name in entries:
                log.debug("loaded cached %s %s", kind, paths[name].name)
            self.tally[kind, "loaded"] += len(entries)
            if missing:
                start = time.time()
                results = compute(missing)
                seconds = (time.time() - start) / len(missing)
                for name in (n for n in missing if n in results):
                    tensors, meta = results[name]
                    self.save(kind, specs[name], tensors, meta)
                    self._note_computed(kind, paths[name].name, seconds)
                    entries[name] = CacheEntry(tensors, meta, paths[name], computed=True)
                    self.tally[kind, "computed"] += 1
                    log.debug("saved %s %s", kind, paths[name])
        return entries

    def _note_computed(self, kind: str, key: str, seconds: float) -> None:
        line = json.dumps({"kind": kind, "key": key, "pid": os.getpid(), "host": socket.gethostname(),
                           "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 3)})
        with open(self.root / LEDGER_FILE, "a") as f:  # one short O_APPEND write: lines never interleave
            f.write(line + "\n")

    def ledger(self) -> list[dict]:
        """Every computation this store has recorded, oldest first."""
        path = self.root / LEDGER_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

