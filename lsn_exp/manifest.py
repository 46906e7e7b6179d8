"""Checksums of a folder's files (the converted model dirs): written once, checked on every load.

``MANIFEST`` maps each file name to its size and sha256. A check hashes the files it is asked about
(a 1 GB fp32 checkpoint takes about a second) and remembers, per process, the files it has already
passed at their current size and mtime.
"""

from __future__ import annotations

import json
from pathlib import Path

from lsn_exp.files import sha256_file, write_text_atomic

MANIFEST = "lsn_manifest.json"
_passed: set[tuple[str, int, int]] = set()


def write(folder: Path) -> dict:
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST}
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(files, indent=2))
    return files


def problem(folder: Path, names: list[str] | None = None) -> str | None:
    """What is wrong with ``folder`` (its manifest, or the files ``names``, default all), or None.
    A folder without a manifest (made before checksums existed) gets one now."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        try:
            write(folder)
        except OSError:  # a read-only shared cache: nothing to check against
            pass
        return None
    try:
        files = json.loads(path.read_text())
    except ValueError:
        return f"{MANIFEST} is unreadable"
    for name in names if names is not None else sorted(files):
        file = Path(folder) / name
        if name not in files:
            return f"{name} is not in {MANIFEST}"
        if not file.is_file():
            return f"{name} is missing"
        stat = file.stat()
        seen = (str(file), stat.st_size, stat.st_mtime_ns)
        if seen in _passed:
            continue
        if stat.st_size != files[name]["size"]:
            return f"{name} has {stat.st_size} bytes, {files[name]['size']} expected (truncated?)"
        if sha256_file(file) != files[name]["sha256"]:
            return f"{name} does not match its sha256"
        _passed.add(seen)
    return None
