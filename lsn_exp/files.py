"""Files that readers can trust: atomic writes (a reader sees the old file or the new one, never half) and
content hashes."""

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
