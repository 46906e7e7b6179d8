"""Portable neuron sets: a self-describing folder (safetensors + a JSON card) to share between labs.

    python -m lsn_exp.neurons export --model gemma3_270m OUT     # the model's newest neuron set -> OUT/
    python -m lsn_exp.neurons show OUT                           # what it holds
    python -m lsn_exp.neurons import OUT --model gemma3_270m     # into the cache (artifacts/<model>/neurons_imported)
    python -m lsn_exp.neurons push OUT user/repo                 # a Hugging Face dataset repo (online)
    python -m lsn_exp.neurons pull user/repo OUT
    python -m lsn_exp model=gemma3_270m identify.from=OUT        # any job, no recording step

The card names the model (its identity: hub id and revision, or the weights' hash), the corpus of every
language (sha256), thresholds, tokens per language, neuron counts per language and layer, and the format
version. A folder made for another model, or in another format, is refused in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import uuid
from pathlib import Path

from lsn_exp.errors import UserError

FORMAT = "lsn_exp.neurons/1"
CARD_FILE = "card.json"
TENSORS_FILE = "neurons.safetensors"
IMPORTED_KIND = "neurons_imported"


def card(store, key: str) -> dict:
    """The card of the store's neuron set ``key``: read from its entry and its recordings' entries."""
    return _card(store, key, *store.read("neurons", key))


def _card(store, key: str, stored: dict, tensors: dict) -> dict:
    recordings = [store.record("recording", name)["spec"] for name in stored["spec"]["recordings"]]
    languages = stored["meta"]["languages"]
    counts = {name.split(".", 1)[1]: {code: [int(n) for n in tensors[name][i].sum(-1).tolist()]
                                      for i, code in enumerate(languages)}
              for name in sorted(tensors) if name.startswith("mask.")}
    first = recordings[0]
    return {"format": FORMAT, "model": first["model"], "dtype": first["dtype"], "languages": languages,
            "corpus": {spec["lang"]: spec["corpus"] for spec in recordings},
            "tokens": dict(zip(languages, stored["meta"].get("tokens", []))),
            "selection": {k: v for k, v in stored["spec"].items() if k != "recordings"},
            "recording": {k: first[k] for k in ("record_version", "split", "max_tokens", "n_stat_sentences", "prefix")},
            "counts_per_layer": counts, "artifact_meta": stored["meta"], "source_key": key}


def export(store, key: str, out: Path) -> Path:
    """``out``/neurons.safetensors + card.json for the store's neuron set ``key`` (read and checked by the store)."""
    import safetensors.torch

    stored, tensors = store.read("neurons", key)
    out.mkdir(parents=True, exist_ok=True)
    (out / TENSORS_FILE).write_bytes(safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}))
    (out / CARD_FILE).write_text(json.dumps(_card(store, key, stored, tensors), indent=2, ensure_ascii=False))
    return out


def exported(store, key: str) -> Path:
    """The store's own export of neuron set ``key`` (artifacts/<model>/neurons_export/<key>), made once; a
    concurrent job that exported it first wins the rename."""
    target = store.root / "neurons_export" / key
    if (target / CARD_FILE).is_file():
        return target
    tmp = export(store, key, target.with_name(f"{key}.tmp-{uuid.uuid4().hex[:8]}"))
    try:
        tmp.rename(target)
    except OSError:  # another job's export is already there
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_card(folder: Path) -> dict:
    path = Path(folder).expanduser() / CARD_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a neuron folder: it has no {CARD_FILE} (make one with "
                        f"`python -m lsn_exp.neurons export`)")
    found = json.loads(path.read_text())
    if found.get("format") != FORMAT:
        raise UserError(f"{folder} is in format {found.get('format')!r}; this lsn_exp reads {FORMAT!r}")
    return found


def card_digest(folder: Path) -> str:
    """What identifies a folder's content: its card and tensors."""
    digest = hashlib.sha256()
    for name in (CARD_FILE, TENSORS_FILE):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()[:20]


def check_model(found: dict, identity: dict, folder) -> None:
    """One line when the folder's neurons were found in another model than ``identity``."""
    if found["model"] != identity:
        theirs, ours = found["model"].get("id", "?"), identity.get("id", "?")
        raise UserError(f"{folder} holds neurons of {theirs} ({_short(found['model'])}), not of this model {ours} "
                        f"({_short(identity)}): neurons are only meaningful in the model they were found in")


def _short(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def load(folder, identity: dict | None = None):
    """(NeuronSet, card) from a folder; with ``identity``, refuses another model's neurons."""
    from safetensors.torch import load_file

    from lsn_exp.neuronset import artifact_from_tensors

    found = read_card(folder)
    if identity is not None:
        check_model(found, identity, folder)
    tensors = load_file(Path(folder).expanduser() / TENSORS_FILE)
    return artifact_from_tensors(tensors, found["artifact_meta"]), found


def import_folder(folder: Path, store) -> Path:
    """Copy a checked folder into the store (kind ``neurons_imported``, keyed by its content)."""
    read_card(folder)
    target = store.root / IMPORTED_KIND / card_digest(folder)
    target.mkdir(parents=True, exist_ok=True)
    for name in (CARD_FILE, TENSORS_FILE):
        shutil.copyfile(Path(folder) / name, target / name)
    return target


def newest_key(store) -> str:
    keys = store.keys("neurons")
    if not keys:
        raise UserError(f"no neuron set under {store.root}: run `python -m lsn_exp stage=identify` first")
    return keys[-1]


def describe(found: dict) -> str:
    lape = found["counts_per_layer"].get("lape", {})
    lines = [f"format {found['format']}; model {found['model'].get('id')} ({found['dtype']})",
             f"languages {' '.join(found['languages'])}; selection {found['selection']}",
             f"recording {found['recording']}"]
    lines += [f"  {code}: {sum(per_layer)} LAPE neurons, {found['tokens'].get(code)} tokens, corpus "
              f"{found['corpus'].get(code, '?')[:19]}" for code, per_layer in lape.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lsn_exp.neurons", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("export", "import"):
        sub = commands.add_parser(name)
        sub.add_argument("folder", type=Path)
        sub.add_argument("--model", required=True, help="a conf/model name, e.g. gemma3_270m")
        sub.add_argument("--cache-dir", default=None)
        if name == "export":
            sub.add_argument("--key", default=None, help="the neuron set's cache key (default: the newest)")
    commands.add_parser("show").add_argument("folder", type=Path)
    push = commands.add_parser("push")
    push.add_argument("folder", type=Path)
    push.add_argument("repo")
    pull = commands.add_parser("pull")
    pull.add_argument("repo")
    pull.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"lsn_exp.neurons: error: {err}", file=sys.stderr)
        raise SystemExit(2)


def run(args) -> None:
    from lsn_exp.cache import CacheStore

    if args.command == "export":
        store = CacheStore.for_model(args.model, args.cache_dir)
        out = export(store, args.key or newest_key(store), args.folder)
        print(f"exported to {out}\n{describe(read_card(out))}")
    elif args.command == "import":
        print(f"imported into {import_folder(args.folder, CacheStore.for_model(args.model, args.cache_dir))}")
    elif args.command == "show":
        print(describe(read_card(args.folder)))
    else:
        hub_transfer(args)


def hub_transfer(args) -> None:
    """push / pull a folder to / from a Hugging Face dataset repo (needs the hub)."""
    from lsn_exp import data

    if data.hub_offline():
        raise UserError(f"neurons {args.command} needs the HF hub, and it is offline (HF_HUB_OFFLINE)")
    import huggingface_hub

    if args.command == "push":
        read_card(args.folder)
        huggingface_hub.upload_folder(repo_id=args.repo, folder_path=str(args.folder), repo_type="dataset")
        print(f"pushed {args.folder} to {args.repo}")
    else:
        huggingface_hub.snapshot_download(args.repo, repo_type="dataset", local_dir=str(args.folder))
        print(describe(read_card(args.folder)))


if __name__ == "__main__":
    main()
