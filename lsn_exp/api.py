"""lsn_exp from your own code, on a Hugging Face causal LM and tokenizer you already have in memory.

The same code paths and cache as the CLI (recordings and neuron sets under ``~/.cache/lsn_exp/artifacts/<name>``)::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lsn_exp import api

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    neurons = api.identify(model, tokenizer, "flores", languages=["en", "id", "ja"])
    with api.amplify(model, neurons, lang="id", factor="pmax"):          # restored bit for bit on exit
        ids = model.generate(**tokenizer("The market", return_tensors="pt"), max_new_tokens=20)
    result = api.lss(model, tokenizer, neurons, target="id", n_facts=40)  # an LssResult: result.mean, .cells

Every keyword of ``conf/identify/lape.yaml``, ``conf/patch/default.yaml`` and ``conf/lss/default.yaml`` is
accepted where it applies; the DiffMean vector is ``alpha=`` (with ``steer_layers=``, ``scale=``).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from lsn_exp import CONF_DIR, data
from lsn_exp.errors import UserError
from lsn_exp.settings import identify_settings, lss_settings

_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ModelHandle (its weights hashed once)


def handle(model, tokenizer=None, name: str | None = None):
    """The ModelHandle lsn_exp uses for ``model`` (built once per model object)."""
    from lsn_exp import models

    found = _HANDLES.get(model)
    if found is None or (name is not None and found.name != name):
        found = _HANDLES[model] = models.from_memory(model, tokenizer, name)
    if tokenizer is not None and found.tokenizer is None:
        models._ensure_pad_token(tokenizer)
        found.tokenizer = tokenizer
    return found


def store(model_handle, cache_dir: str | None = None):
    from lsn_exp.cache import CacheStore

    return CacheStore.for_model(model_handle.name, cache_dir)


def identify(model, tokenizer, texts: str | dict[str, list[str]] = "flores", *, languages: list[str] | None = None,
             data_root: str | Path | None = None, cache_dir: str | None = None, seed: int = 0, force: bool = False,
             **settings):
    """LAPE, baseline and random neuron sets with p_max / p_median and DiffMean vectors (a NeuronSet).

    ``texts``: "flores" (FLORES-200 ``split`` of ``languages``, default the paper's 18) or {language: sentences}."""
    from lsn_exp import identify as identify_stage

    if isinstance(texts, str) and texts != "flores":
        raise UserError(f"texts={texts!r}: pass 'flores' or a dict {{language: [sentence, ...]}}")
    parsed = identify_settings({**settings, **({"languages": list(languages)} if languages else {})})
    own = handle(model, tokenizer)
    root = data.resolve_root(None if data_root is None else str(data_root)) if texts == "flores" else None
    found = identify_stage.build(parsed, own, root, store(own, cache_dir), seed=seed, force=force,
                                 texts=None if texts == "flores" else dict(texts))
    return found.neurons


def intervention(neurons, lang: str, factor="pmax", *, alpha: float = 0.0, steer_layers=None,
                 scale: str = "resid_norm", prompt: str = "none", data_root=None, **patch):
    """The Intervention (neuron patch, DiffMean vector, prompt baseline) toward ``lang``, as the CLI builds it."""
    from lsn_exp.specs import Intervention, parse_factor

    _require_lang(neurons, lang)
    patch_cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "patch" / "default.yaml"), patch)
    steer = {"alpha": alpha, "layers": steer_layers, "scale": scale}
    root = data.resolve_root(data_root) if prompt != "none" else None
    return Intervention.from_settings(lang, parse_factor(factor), patch_cfg, steer, {"mode": prompt}, root)


def _require_lang(neurons, lang: str) -> None:
    if lang not in neurons.languages:
        raise UserError(f"lang={lang} has no neurons here: the neuron set covers {' '.join(neurons.languages)}")


@contextmanager
def amplify(model, neurons, lang: str, factor="pmax", **options):
    """Patch (and steer) ``model`` toward ``lang`` inside the ``with`` block; everything is restored on exit.

    ``factor``: pmax | pmedian (set the neurons to that value) | a number (multiply them); ``options`` as
    ``intervention`` (op, value, stat, layers, others_op, alpha, ...). A prompt baseline has nothing to patch."""
    from lsn_exp.engine import engine_of

    spec = intervention(neurons, lang, factor, **options)
    if spec.prefix:
        raise UserError("amplify changes the model, not the prompt: put the prompt baseline's prefix before your "
                        "prompt yourself (api.intervention(...).prefix)")
    with engine_of(handle(model)).intervene(neurons, spec):
        yield spec


def export_vectors(model, neurons, lang: str, path: str | Path, *, alpha: float, steer_layers=None,
                   scale: str = "resid_norm") -> Path:
    """The DiffMean vectors toward ``lang`` that ``amplify(..., alpha=alpha)`` adds, in a file other tools read:
    ``.pt`` for lm-eval's ``steered`` model, ``.gguf`` for a llama.cpp control vector (``lsn_exp.vectorfiles``)."""
    from lsn_exp import vectorfiles
    from lsn_exp.specs import SteerSpec
    from lsn_exp.steer import steering_vectors

    own, path = handle(model), Path(path)
    _require_lang(neurons, lang)
    spec = SteerSpec.from_config({"alpha": alpha, "layers": steer_layers, "scale": scale}, lang)
    vectors = steering_vectors(neurons, spec, own.adapter.n_layers)
    if path.suffix == ".pt":
        names = {id(module): name for name, module in own.model.base_model.named_modules()}
        hookpoints = {layer: names[id(site)] for layer, site in enumerate(own.adapter.site("resid_post"))}
        return vectorfiles.write_steered(vectors, path, hookpoints)
    if path.suffix == ".gguf":
        return vectorfiles.write_control_vector(vectors, path, own.model.config.model_type, own.adapter.n_layers)
    raise UserError(f"{path}: name a .pt file (lm-eval steered) or a .gguf file (llama.cpp control vector)")


def lss(model, tokenizer, neurons, target: str, factor="pmax", *, n_facts: int | str | None = None, sources="all",
        data_root=None, cache_dir=None, **options):
    """LSS(s -> target) on parallel mLAMA facts for every source s (an LssResult), the unpatched scores cached.

    ``n_facts`` None: conf/lss/default.yaml's. ``options``: any key of that file (seed, tol, batch_size, bootstrap)
    or of ``intervention``."""
    from lsn_exp import lss as lss_stage

    lss_keys = set(OmegaConf.load(CONF_DIR / "lss" / "default.yaml"))
    given = {"sources": sources, **({} if n_facts is None else {"n_facts": n_facts})}
    parsed = lss_settings({**given, **{k: v for k, v in options.items() if k in lss_keys}})
    spec = intervention(neurons, target, factor, data_root=data_root,
                        **{k: v for k, v in options.items() if k not in lss_keys})
    own = handle(model, tokenizer)
    return lss_stage.lss_for_target(own, neurons, spec, parsed, data.resolve_root(data_root), store(own, cache_dir))
