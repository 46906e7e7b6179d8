"""Stage 1b: turn a Recording into neuron sets (lape, baseline, random) and patch values.

LAPE follows Tang et al. (2024): activation probability p = count / tokens per language,
entropy of p normalised over languages, keep the lowest-entropy ``top_rate`` share of neurons
that pass the ``filter_rate`` quantile of all p, and assign each to every language whose p
exceeds the ``bar_rate`` quantile.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, data, models, outputs, record
from lsn_exp.cache import CacheStore, key_of
from lsn_exp.engine import engine_of
from lsn_exp.files import sha256_file
from lsn_exp.models import device_key
from lsn_exp.neuronset import NeuronSet, artifact_from_tensors, artifact_to_tensors
from lsn_exp.record import Recording, RecordingBar, prefix_token, stack_languages
from lsn_exp.settings import IdentifySettings


def activation_probability(recording: Recording) -> torch.Tensor:
    tokens = recording.tokens.clamp(min=1).to(torch.float64)
    return (recording.counts.to(torch.float64) / tokens[:, None, None]).to(torch.float32)


def kth_value(values: torch.Tensor, rate: float) -> float:
    """The value at 1-based rank round(rate * n) of the sorted values (Tang et al.'s kthvalue)."""
    flat = values.flatten().to(torch.float64)
    rank = min(max(round(rate * flat.numel()), 1), flat.numel())
    return flat.kthvalue(rank).values.item()


def lape_masks(prob: torch.Tensor, top_rate: float, filter_rate: float, bar_rate: float) -> tuple[torch.Tensor, dict]:
    """LAPE selection on p [K, L, d]; returns bool [K, L, d] and the thresholds used."""
    n_langs, n_layers, d_ff = prob.shape
    p = prob.to(torch.float64).permute(1, 2, 0)  # [L, d, K]
    total = p.sum(dim=-1, keepdim=True)
    normed = torch.where(total > 0, p / total.clamp(min=1e-300), torch.zeros_like(p))
    plogp = torch.where(normed > 0, normed * normed.clamp(min=1e-300).log(), torch.zeros_like(normed))
    entropy = -plogp.sum(dim=-1)  # [L, d]
    tau = kth_value(prob, filter_rate)
    entropy[(p > tau).sum(dim=-1) == 0] = float("inf")
    n_candidates = round(top_rate * n_layers * d_ff)
    candidates = entropy.flatten().topk(n_candidates, largest=False).indices
    candidates = candidates[entropy.flatten()[candidates].isfinite()]
    bar = kth_value(prob, bar_rate)
    selected = torch.zeros(n_layers * d_ff, n_langs, dtype=torch.bool)
    selected[candidates] = p.reshape(-1, n_langs)[candidates] > bar
    masks = selected.T.reshape(n_langs, n_layers, d_ff).contiguous()
    kept = int(selected.any(dim=1).sum())
    return masks, {"tau_filter": tau, "bar": bar, "n_candidates": n_candidates,
                   "n_dropped_candidates": n_candidates - kept}


def random_masks(reference: torch.Tensor, seed: int) -> torch.Tensor:
    """For each language and layer, as many random neurons as ``reference`` holds there."""
    n_langs, n_layers, d_ff = reference.shape
    counts = reference.sum(dim=2)
    out = torch.zeros_like(reference)
    generator = torch.Generator().manual_seed(seed)
    for k in range(n_langs):
        for layer in range(n_layers):
            picks = torch.randperm(d_ff, generator=generator)[: int(counts[k, layer])]
            out[k, layer, picks] = True
    return out


def identify(recording: Recording, top_rate: float, filter_rate: float, bar_rate: float,
             seed: int) -> NeuronSet:
    prob = activation_probability(recording)
    lape, thresholds = lape_masks(prob, top_rate, filter_rate, bar_rate)
    masks = {"lape": lape, "baseline": recording.always_active.clone(), "random": random_masks(lape, seed)}
    meta = {"thresholds": thresholds, "rates": {"top": top_rate, "filter": filter_rate, "bar": bar_rate},
            "seed": seed, "tokens": recording.tokens.tolist(), "sentences": recording.sentences.tolist()}
    return NeuronSet(languages=list(recording.languages), masks=masks, p_max=recording.p_max,
                          p_median=recording.p_median, activation_prob=prob, meta=meta,
                          resid_mean=recording.resid_mean, resid_norm=recording.resid_norm)


# --- cached stage entry ---------------------------------------------------------------------------

@dataclass(frozen=True)
class IdentifyResult:
    neurons: NeuronSet
    recorded: bool  # False when the recording came from the cache
    key: str
    data_files: list


IDENTIFY_VERSION = 2  # bump when selection (LAPE, baseline, random) or the neuron set's layout changes


def recording_spec(handle, settings, prefix) -> dict:
    """What a recording depends on, besides its language and corpus: the cache key's shared part."""
    return {"model": handle.identity, "dtype": str(handle.model.dtype).replace("torch.", ""),
            **device_key(handle, transformers=True),  # recording runs on transformers whatever the engine
            "record_version": record.RECORD_VERSION, "split": settings.split,
            "max_tokens": settings.max_tokens or "all",
            "n_stat_sentences": settings.n_stat_sentences, "prefix": prefix.as_meta()}


def corpus_id(corpus) -> str:
    """What a recording's text is, for its cache key: the file's hash, the hub dataset, or the texts' hash."""
    if corpus.path is not None:
        return f"sha256:{sha256_file(corpus.path)}"
    if getattr(corpus, "user", False):
        return "texts-sha256:" + hashlib.sha256("\n".join(corpus.sentences).encode("utf-8")).hexdigest()
    return f"hub:{data.FLORES_HUB_ID}"


@dataclass(frozen=True)
class UserTexts:
    """Sentences a caller passed in (lsn_exp.api.identify) instead of a FLORES file."""

    sentences: list[str]
    path: None = None
    user: bool = True


def recording_plan(settings, handle, data_root, texts: dict[str, list[str]] | None = None) -> tuple:
    """(prefix, corpus per language, recording cache spec per language): what ``build`` records, keyed."""
    prefix = prefix_token(handle.tokenizer, settings.prefix)
    if texts is not None:
        corpora = {code: UserTexts(list(sentences)) for code, sentences in texts.items()}
    else:
        corpora = {lang.code: data.flores(data_root, lang, settings.split)
                   for lang in data.languages(list(settings.languages))}
    shared = recording_spec(handle, settings, prefix)
    return prefix, corpora, {code: {**shared, "lang": code, "corpus": corpus_id(corpus)}
                             for code, corpus in corpora.items()}


def selection_spec(recording_keys: list[str], settings, seed: int) -> dict:
    """The neuron set's cache spec: its recordings' keys and the selection's thresholds."""
    return {"recordings": list(recording_keys), "identify_version": IDENTIFY_VERSION, "top_rate": settings.top_rate,
            "filter_rate": settings.filter_rate, "bar_rate": settings.bar_rate, "seed": seed}


def neurons_key(settings: IdentifySettings, handle, data_root, seed: int) -> str:
    """The key ``build`` gives the neuron set, computed without recording anything (factor=best and
    method=best look their search up by it before a job records)."""
    _, _, specs = recording_plan(settings, handle, data_root)
    return key_of(selection_spec([key_of(spec) for spec in specs.values()], settings, seed))


def build(settings: IdentifySettings, handle, data_root, store, seed: int, force: bool = False,
          texts: dict[str, list[str]] | None = None) -> IdentifyResult:
    """The neuron set for ``handle``: each language recorded once per key, selection once per thresholds.

    Recordings are cached per language, so an interrupted run resumes at the language it stopped in
    and adding a language records only that one. ``texts`` (language -> sentences) replaces FLORES and
    ``identify.languages``.
    """
    prefix, corpora, specs = recording_plan(settings, handle, data_root, texts)
    batch_size = settings.batch_size or handle.batch_size
    engine, bar = engine_of(handle), RecordingBar(len(corpora))
    stats, entries = {}, []
    try:
        for code, corpus in corpora.items():
            entry = store.get_or_compute(
                "recording", specs[code], force=force,
                compute=lambda c=corpus, k=code: (engine.record(
                    c.sentences, settings.max_tokens, settings.n_stat_sentences, prefix, batch_size,
                    desc=f"record {k}", progress=bar), {"lang": k}))
            bar.finished(entry.computed)
            stats[code] = entry.tensors
            entries.append(entry)
    finally:
        bar.close()
    recording = stack_languages(stats)
    recorded = any(e.computed for e in entries)
    select_spec = selection_spec([e.path.name for e in entries], settings, seed)

    def compute_artifact():
        tensors, meta = artifact_to_tensors(identify(recording, settings.top_rate, settings.filter_rate,
                                                     settings.bar_rate, seed))
        return tensors, {**meta, "prefix": prefix.as_meta(), "max_tokens": settings.max_tokens or "all",
                         "split": settings.split}

    art_entry = store.get_or_compute("neurons", select_spec, compute_artifact, force=force)
    neurons = artifact_from_tensors(art_entry.tensors, art_entry.meta)
    files = [c.path for c in corpora.values() if c.path is not None]
    return IdentifyResult(neurons, recorded=recorded, key=art_entry.path.name, data_files=files)


def jaccard(masks: torch.Tensor) -> torch.Tensor:
    """float [K, K]: overlap |A∩B| / |A∪B| of the languages' neuron sets (bool [K, L, d])."""
    flat = masks.flatten(1).to(torch.float32)
    inter = flat @ flat.T
    sizes = flat.sum(dim=1)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def write_outputs(neurons: NeuronSet, out_dir) -> tuple[dict, dict]:
    """CSV of neurons per language x layer for each set, a per-layer plot and the LAPE overlap heatmap."""
    per_layer = {name: neurons.counts_per_layer(name).tolist() for name in ("lape", "baseline")}
    return outputs.neuron_tables(neurons.languages, per_layer, jaccard(neurons.masks["lape"]).numpy(), Path(out_dir))


def summary(neurons: NeuronSet, top_overlaps: int = 5) -> dict:
    lape = neurons.masks["lape"]
    overlap = jaccard(lape)
    langs = neurons.languages
    pairs = sorted(((overlap[i, j].item(), langs[i], langs[j]) for i in range(len(langs))
                    for j in range(i + 1, len(langs))), reverse=True)[:top_overlaps]
    return {
        "lape_neurons": {code: int(n) for code, n in zip(langs, lape.flatten(1).sum(1).tolist())},
        "lape_union": int(lape.any(dim=0).sum()),
        "baseline_neurons": {code: int(n) for code, n in
                             zip(langs, neurons.masks["baseline"].flatten(1).sum(1).tolist())},
        "largest_overlaps": [{"pair": f"{a}-{b}", "jaccard": round(v, 4)} for v, a, b in pairs],
        **{k: v for k, v in neurons.meta.get("thresholds", {}).items()},
        **{k: neurons.meta[k] for k in ("prefix", "max_tokens", "split") if k in neurons.meta},
        "tokens": dict(zip(langs, neurons.meta.get("tokens", []))),
    }


def load_with_neurons(model_name: str, identify_overrides: dict | None = None, seed: int = 0):
    """(handle, neurons) for a model config with the default identify settings: for scripts and tests."""
    handle = models.load(OmegaConf.load(CONF_DIR / "model" / f"{model_name}.yaml"))
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "identify" / "lape.yaml"), identify_overrides or {})
    store = CacheStore.for_model(model_name)
    return handle, build(cfg, handle, data.resolve_root(None), store, seed=seed).neurons
