"""Steering vectors in the files other tools read: lm-eval's ``steered`` model and llama.cpp control vectors.

A vector set is ``{layer: float32 [d_model]}``, added to the residual stream after decoder layer ``layer`` at every
position (what ``lsn_exp.steer.steering_vectors`` gives: alpha and the scale already applied).

- lm-eval ``steered`` (``--model steered --model_args pretrained=...,steer_path=FILE.pt``): a ``torch.save`` dict
  ``{hookpoint: {steering_vector, steering_coefficient, action, bias, head_index}}``; the hookpoint is the decoder
  layer's module name under ``model.base_model`` (``layers.3`` for Llama, Gemma and Qwen2), and lm-eval adds
  ``coefficient x vector`` to that module's output, as our steer does.
- llama.cpp control vector (``--control-vector FILE.gguf``; repeng and EasySteer read the same layout): a GGUF of
  architecture ``controlvector`` with one float32 tensor ``direction.<layer>`` per layer, added to that layer's
  output. llama.cpp reads ``direction.1`` upward, so a vector on layer 0 cannot be written there (refused).

Writing and reading back give the same tensors bit for bit (``tests/test_vectorfiles.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

from lsn_exp.errors import UserError

HOOKPOINT = re.compile(r"^(?:.*\.)?layers\.(\d+)$")
DIRECTION = re.compile(r"^direction\.(\d+)$")
CONTROL_ARCH = "controlvector"


def write_steered(vectors: dict, path: Path, hookpoints: dict[int, str]) -> Path:
    """``vectors`` as an lm-eval ``steered`` file; ``hookpoints``: layer -> module name under ``base_model``."""
    import torch

    missing = sorted(set(vectors) - set(hookpoints))
    if missing:
        raise UserError(f"no hookpoint for layer(s) {missing}: the model has layers 0..{len(hookpoints) - 1}")
    entries = {hookpoints[layer]: {"steering_vector": vector.detach().to("cpu", torch.float32).clone(),
                                   "steering_coefficient": 1.0, "action": "add", "bias": None, "head_index": None}
               for layer, vector in sorted(vectors.items())}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(entries, path)
    return Path(path)


def read_steered(path: Path) -> dict:
    """An lm-eval ``steered`` .pt file as ``{layer: vector}`` (coefficient applied); only ``add`` on whole
    decoder layers reads back as a residual-stream vector."""
    import torch

    found = {}
    for hookpoint, entry in torch.load(path, weights_only=False).items():
        match = HOOKPOINT.match(hookpoint)
        if match is None or entry.get("action") != "add" or entry.get("head_index") is not None:
            raise UserError(f"{path}: {hookpoint} ({entry.get('action')}) is not an add on a decoder layer's output: "
                            f"only those are residual-stream vectors")
        vector = entry["steering_vector"].to(torch.float32)
        coefficient = float(entry.get("steering_coefficient", 1.0))
        found[int(match.group(1))] = vector if coefficient == 1.0 else vector * coefficient
    return found


def write_control_vector(vectors: dict, path: Path, model_hint: str, n_layers: int) -> Path:
    """``vectors`` as a llama.cpp control vector (``model_hint``: the model's architecture name, e.g. gemma3)."""
    import gguf

    if 0 in vectors:
        raise UserError("llama.cpp control vectors start at layer 1 (direction.1): steer.layers must not hold 0 "
                        "for this export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), CONTROL_ARCH)
    writer.add_string(f"{CONTROL_ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{CONTROL_ARCH}.layer_count", n_layers)
    for layer, vector in sorted(vectors.items()):
        writer.add_tensor(f"direction.{layer}", vector.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_control_vector(path: Path) -> dict:
    """A llama.cpp control vector as ``{layer: vector}``."""
    import gguf
    import torch

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    if arch is None or bytes(arch.parts[arch.data[0]]).decode() != CONTROL_ARCH:
        raise UserError(f"{path} is not a control vector (general.architecture is not {CONTROL_ARCH})")
    found = {}
    for tensor in reader.tensors:
        match = DIRECTION.match(tensor.name)
        if match:
            found[int(match.group(1))] = torch.from_numpy(tensor.data.copy()).to(torch.float32).reshape(-1)
    return found
