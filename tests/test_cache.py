"""The cache store, the model-dir manifest and the preflight probe, in-process (the fault suite runs them for real)."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch

from lsn_exp import manifest, preflight
from lsn_exp.cache import CacheStore

SPEC = {"what": "test", "n": 1}


def _flip(path, where: float = 0.75) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "meta"])
def test_a_damaged_entry_is_reported_in_one_line_and_recomputed(tmp_path, caplog, damage):
    store = CacheStore(tmp_path)
    store.get_or_compute("kind", SPEC, lambda: ({"x": torch.arange(1000.0)}, {"m": 1}))
    entry = store.entry_dir("kind", SPEC)
    if damage == "truncate":
        (entry / "tensors.safetensors").write_bytes((entry / "tensors.safetensors").read_bytes()[:500])
    elif damage == "bitflip":
        _flip(entry / "tensors.safetensors")
    else:
        (entry / "meta.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="lsn_exp.cache"):
        again = store.get_or_compute("kind", SPEC, lambda: ({"x": torch.arange(1000.0)}, {"m": 1}))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert again.computed and len(warnings) == 1 and "is damaged" in warnings[0] and "\n" not in warnings[0]
    assert [row["key"] for row in store.ledger()] == [entry.name, entry.name]  # computed, then recomputed
    assert not store.get_or_compute("kind", SPEC, lambda: pytest.fail("recomputed a sound entry")).computed


def test_an_entry_written_before_checksums_is_adopted(tmp_path):
    store = CacheStore(tmp_path)
    store.save("kind", SPEC, {"x": torch.ones(3)}, {})
    meta_path = store.entry_dir("kind", SPEC) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]
    meta_path.write_text(json.dumps(meta))
    assert store.load("kind", SPEC) is not None and "sha256" in json.loads(meta_path.read_text())
    _flip(store.entry_dir("kind", SPEC) / "tensors.safetensors")
    assert store.load("kind", SPEC) is None  # from now on it is checked


def test_many_computes_only_the_missing_entries_in_one_call(tmp_path):
    store = CacheStore(tmp_path)
    specs = {name: {"name": name} for name in "abc"}
    store.get_or_compute("kind", specs["b"], lambda: ({"x": torch.zeros(1)}, {}))
    calls = []

    def compute(names):
        calls.append(sorted(names))
        return {name: ({"x": torch.full((1,), float(ord(name)))}, {}) for name in names if name != "c"}

    found = store.get_or_compute_many("kind", specs, compute)
    assert calls == [["a", "c"]] and sorted(found) == ["a", "b"]  # c was left out by compute
    assert (found["a"].computed, found["b"].computed) == (True, False)


def test_two_threads_on_one_entry_compute_it_once(tmp_path):
    store, computed = CacheStore(tmp_path), []

    def compute():
        computed.append(1)
        threading.Event().wait(0.2)
        return {"x": torch.ones(2)}, {}

    threads = [threading.Thread(target=store.get_or_compute, args=("kind", SPEC, compute)) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(computed) == 1 and len(store.ledger()) == 1


def test_a_killed_writers_temp_dir_is_removed_by_the_next_lock_holder(tmp_path):
    store = CacheStore(tmp_path)
    stale = store.entry_dir("kind", SPEC).with_name(store.entry_dir("kind", SPEC).name + ".tmp12345")
    stale.mkdir(parents=True)
    (stale / "tensors.safetensors").write_bytes(b"half")
    store.get_or_compute("kind", SPEC, lambda: ({"x": torch.ones(2)}, {}))
    assert not stale.exists()


def test_the_manifest_finds_truncation_and_bit_flips(tmp_path):
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    assert manifest.problem(tmp_path) is None and (tmp_path / manifest.MANIFEST).exists()  # adopted
    _flip(tmp_path / "weights.bin")
    assert "weights.bin does not match its sha256" == manifest.problem(tmp_path)
    assert manifest.problem(tmp_path, ["tokenizer.json"]) is None  # only what the caller reads
    (tmp_path / "tokenizer.json").write_text("{")
    assert "tokenizer.json has 1 bytes" in manifest.problem(tmp_path, ["tokenizer.json"])


def test_preflight_names_why_a_place_is_unwritable(tmp_path):
    assert preflight.unwritable(tmp_path / "new" / "dir") is None and (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("x")
    assert preflight.unwritable(tmp_path / "file" / "sub") == "Not a directory"
    with pytest.raises(preflight.UserError, match=r"cache dir .* is not writable \(Not a directory\): set it"):
        preflight.require_writable(tmp_path / "file" / "sub", "cache dir", "set it")
