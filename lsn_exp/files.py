"""Files that readers can trust: atomic writes (a reader sees the old file or the new one, never half), content
hashes, and where the cache lives."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same dir, then rename: readers never see half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same dir, fsync, then rename: readers see the old file or the new one.
    A failed write (a full disk) removes the temp file and leaves the old file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root(cache_dir: str | None = None) -> Path:
    """The cache of converted models and results: ``cache_dir``, else $LSN_CACHE, else ~/.cache/lsn_exp."""
    root = cache_dir or os.environ.get("LSN_CACHE") or Path.home() / ".cache" / "lsn_exp"
    return Path(root).expanduser()


def store_dir(model_name: str, cache_dir: str | None = None) -> Path:
    """Where the cache store of the model named ``model_name`` (conf/model/<name>.yaml) lives."""
    return cache_root(cache_dir) / "artifacts" / model_name
