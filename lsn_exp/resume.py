"""When a re-run may skip a cell: its results.json holds the same config hash (the resolved config, the code version
left in, the machine settings left out) and, for factor=best / method=best, the winner the store still holds.

The winner is resolved after the model loads (it is keyed by the model and neuron set), the skip is decided
before: so a cell records the winner it ran (kind, cache key, the entry) and a re-run compares it with that
cache entry as it is now. No entry there (another machine's cache) leaves the recorded winner standing.
Light imports only: a dry run and a skipped cell load no torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import lsn_exp
from lsn_exp.errors import UserError
from lsn_exp.results import RESULTS_FILE

log = logging.getLogger(__name__)

PACKAGE = Path(lsn_exp.__file__).resolve().parent
# Settings that cannot change a cell's results: a cell finished on one machine is not recomputed on another.
IGNORED_FOR_RESUME = ("force", "dry_run", "logger", "threads", "scoring_processes", "cache_dir")


@functools.cache
def code_version(package: Path = PACKAGE) -> str:
    """The package version and a hash of every .py and .yaml file of the package (task YAMLs and utils too).
    Why a hash: a git commit moves with every docs or test edit and is missing from an installed copy; a constant
    is bumped by hand, or forgotten. The hash moves exactly when the code does (a docstring too: that only
    recomputes), and costs ~10 ms once per process."""
    digest = hashlib.sha256(lsn_exp.__version__.encode())
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return f"{lsn_exp.__version__}+{digest.hexdigest()[:12]}"


def config_hash(cfg: DictConfig, code: str | None = None) -> str:
    """The cell's resume hash: the resolved config but ``IGNORED_FOR_RESUME``, and ``code`` (default the
    package's ``code_version``)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    kept = {k: v for k, v in resolved.items() if k not in IGNORED_FOR_RESUME}
    kept["code_version"] = code or code_version()
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def best_under(store, kind: str, spec: dict, field: str, missing: str) -> tuple[dict, dict]:
    """The one way to read a saved winner (``factor=best``: the factor search's ``entry``; ``method=best``: the
    compare run's ``method``): (the winner entry's meta, what the job records of it, ``winner``). Without a
    winner under ``spec`` in ``store``: a UserError saying ``missing`` (how to make one)."""
    found = None if store is None else store.load(kind, spec)
    if found is None:
        raise UserError(missing)
    return found.meta, winner(store.root, kind, spec, field)


def winner(root: Path, kind: str, spec: dict, field: str) -> dict:
    """What a job records of the winner it resolved: the cache entry (``kind``, key of ``spec``) and its
    ``field`` (the factor search's ``entry``, the compare run's ``method``)."""
    from lsn_exp.cache import key_of

    key = key_of(spec)
    return {"kind": kind, "key": key, "field": field, "winner": _stored(Path(root), kind, key, field)}


def _stored(root: Path, kind: str, key: str, field: str):
    from lsn_exp.cache import META_FILE

    return json.loads((root / kind / key / META_FILE).read_text())["meta"][field]


def completed(run_dir: Path, digest: str, root: Path) -> bool:
    """The cell has results for ``digest`` and every winner it recorded is still the one in the store at ``root``."""
    try:
        results = json.loads((run_dir / RESULTS_FILE).read_text())["results"]
    except (OSError, ValueError, KeyError):
        return False
    if results.get("config_hash") != digest:
        return False
    for target, ran in (results.get("winners") or {}).items():
        if not (Path(root) / ran["kind"] / ran["key"]).exists():
            continue
        try:
            now = _stored(Path(root), ran["kind"], ran["key"], ran["field"])
        except (OSError, ValueError, KeyError):
            now = None
        if now != ran["winner"]:
            log.info("the winner toward %s is no longer %s but %s: recomputing", target, ran["winner"], now)
            return False
    return True


def run_id(results: dict) -> str:
    """The cell's W&B run id: its config hash, and the winners it ran (a new winner is a new run)."""
    digest, winners = results["config_hash"], results.get("winners")
    if winners:
        digest = hashlib.sha256(json.dumps([digest, winners], sort_keys=True).encode()).hexdigest()[:16]
    return f"lsn-{digest}"
