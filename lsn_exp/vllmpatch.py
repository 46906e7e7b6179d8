"""Neuron patches and DiffMean vectors inside vLLM: a spec becomes values for the buffers ``lsn_exp.vllmplugin``
builds into each decoder layer, written in place for the length of a ``with`` block.

A layer's patch actions (``patch.plan_layer``, the gate-hook form: set / add / multiply on chosen neurons, in
order) fold into four [d_ff] rows, so that ``act(gate)`` becomes ``act(gate) * scale + shift``, or ``value`` where
``set``. Multiply therefore runs as a scale on the fused op's output (not a weight edit: the CPU build prepacks
its weights, and the buffers reach compiled graphs where an edit might not). A DiffMean vector
(``steer.steering_vectors``) goes to the layer's ``vector`` row, on the true residual stream.

Compilation, CUDA graphs and the multi-process engine are all reached (the buffers are built before the first
forward and changed in place). Prefix caching is reset at every change, so no KV computed under another patch is
served. Refused in one line: test-time statistics (a per-row statistic of the prompt's own tokens needs each
request's attention mask inside the fused op), speculative decoding (the draft model would decode unpatched), an
engine whose model has no buffers, and a second intervention while one is active.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from lsn_exp.errors import UserError
from lsn_exp.patch import check_artifact, plan_layer
from lsn_exp.results import PatchSummary
from lsn_exp.specs import Intervention, PatchSpec, check_layers
from lsn_exp.steer import intervene, steering_vectors
from lsn_exp.vllmplugin import write


def fold_actions(actions: list, width: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The rows (scale, shift, set, value; [width], on the CPU) that do ``actions`` in order on ``act(gate)``."""
    scale, shift = torch.ones(width, dtype=dtype), torch.zeros(width, dtype=dtype)
    is_set, value = torch.zeros(width, dtype=torch.bool), torch.zeros(width, dtype=dtype)
    for action in actions:
        idx, v = action.idx.cpu(), action.values.cpu().to(dtype)
        if action.op == "set":
            is_set[idx], value[idx], scale[idx], shift[idx] = True, v, 1, 0
        elif action.op == "add":
            value[idx], shift[idx] = value[idx] + v, shift[idx] + v
        else:
            value[idx], scale[idx], shift[idx] = value[idx] * v, scale[idx] * v, shift[idx] * v
    return {"scale": scale, "shift": shift, "set": is_set, "value": value}


def buffer_rows(handle, neurons, spec: PatchSpec | Intervention) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: rows} for ``spec`` on the model ``handle`` describes (its adapter and dtype; nothing runs on it)."""
    patch = spec.patch if isinstance(spec, Intervention) else spec
    steer = spec.steer if isinstance(spec, Intervention) else None
    if patch.stat is not None:
        raise UserError("patch.stat (test-time statistics) does not run inside vLLM: use engine=hf")
    check_artifact(handle, neurons, patch)
    dtype, width = handle.model.dtype, handle.adapter.d_ff
    rows = {}
    for layer in check_layers(patch.layers, handle.adapter.n_layers):
        plan = plan_layer(handle, neurons, patch, layer, weight_edit=False)
        if plan.actions:
            rows[layer] = fold_actions(plan.actions, width, dtype)
    if steer is not None and not steer.is_noop:
        for layer, vector in steering_vectors(neurons, steer, handle.adapter.n_layers).items():
            rows.setdefault(layer, {})["vector"] = vector.to(dtype)
    return rows


def check_engine(llm) -> None:
    """An engine whose every decoded token the buffers reach."""
    if llm.llm_engine.vllm_config.speculative_config is not None:
        raise UserError("a vLLM patch cannot run with speculative decoding: the draft model would decode unpatched")


class VllmIntervention:
    """``with VllmIntervention(llm, handle, neurons, spec): ...``: ``llm`` (a vllm.LLM built steerable, see
    ``lsn_exp.vllmengine``) runs ``spec`` inside the block and is back to the identity after it."""

    active: set[int] = set()  # id() of the engines with an intervention written now

    def __init__(self, llm, handle, neurons, spec: PatchSpec | Intervention):
        self.llm, self.spec = llm, spec
        self.rows = buffer_rows(handle, neurons, spec)
        self._summary = intervene(handle, neurons, spec).summary()  # counts only: nothing is installed on handle

    reads_whole_rows = False

    def summary(self) -> PatchSummary:
        return replace(self._summary, weight_edit_layers=0, hook_layers=len(self.rows), steer_norm_ratio=None)

    def __enter__(self) -> VllmIntervention:
        check_engine(self.llm)
        if id(self.llm) in self.active:
            raise UserError("one intervention at a time inside a vLLM engine: combine them in one Intervention")
        self._write(self.rows)
        self.active.add(id(self.llm))
        return self

    def __exit__(self, *exc) -> None:
        if id(self.llm) in self.active:
            self.active.discard(id(self.llm))
            self._write({})

    def _write(self, rows: dict) -> None:
        written = self.llm.apply_model(partial(write, rows=rows))
        if not all(written):
            raise UserError("this vLLM engine's model has no lsn_exp buffers: start it with lsn_exp.vllmengine.start "
                            "(lsn_exp installed where vLLM runs), on a model whose MLP is SiluAndMul or GeluAndMul")
        if self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
            self.llm.reset_prefix_cache()  # KV computed under the previous buffers must not be served
