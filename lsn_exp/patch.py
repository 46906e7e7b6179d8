"""Stage 2: amplify the target language's neurons (the paper's intervention).

Sites (lsn_exp.models.SITES), one per decoder layer l:
    mlp.gate = act_fn(gate_proj(x))                         [batch, pos, d_ff]
    mlp(x) = mlp.down(mlp.gate * up_proj(x))                neuron j <-> input column j of mlp.down

A patch rewrites mlp.gate[..., j] for the target language's neurons j at the selected layers, at every
position and for every row, in scoring and in generation (KV-cache decode steps included):
  mul c, set 0       weight edit: mlp.down.weight[:, j] *= c (0). Exact for an element-wise factor, free
                     at run time; the original columns are kept and restored bit for bit.
  set v, add v       one forward hook per layer on mlp.gate; v a number or the neuron's stored value (pmax,
                     pmedian) for the target, as precomputed index and value tensors; no host sync.
  stat (test time)   v = coef * statistic of the sample's own real tokens x all d_ff neurons of the layer
                     (percentile: the coef-th percentile; lsn_exp.teststat), computed in the same hook.
The spec (what to do) is ``lsn_exp.specs.PatchSpec``; this module is the runtime that does it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lsn_exp.errors import UserError
from lsn_exp.results import PatchSummary
from lsn_exp.specs import PatchSpec, check_layers

if TYPE_CHECKING:
    import torch

    from lsn_exp.models import ModelHandle
    from lsn_exp.neuronset import NeuronSet


# --- the plan: what each layer does, computed once on the host ------------------------------------------

@dataclass
class _Action:
    """One op on some neurons of one layer's gate site."""

    idx: torch.Tensor  # int64 [n] on the layer's device
    op: str  # mul | set | add
    values: torch.Tensor | None  # [n] in the activation dtype; None: the per-sample statistic


@dataclass
class _LayerPlan:
    layer: int
    target_neurons: int
    others_neurons: int
    edit_idx: torch.Tensor | None = None  # int64 [m]: mlp.down columns to scale
    edit_scale: torch.Tensor | None = None  # float32 [m]
    actions: list[_Action] = field(default_factory=list)  # run by the layer's gate hook, in order

    @property
    def is_noop(self) -> bool:
        return not self.actions and self.edit_idx is None


def _stored_values(neurons: NeuronSet, spec: PatchSpec, idx, value, source, layer: int) -> torch.Tensor:
    """float32 [n]: the constant, or each neuron's stored value (pmax / pmedian) for the target."""
    import torch

    if source is None:
        return torch.full((idx.numel(),), float(value), dtype=torch.float32)
    stored = neurons.p_max if source == "pmax" else neurons.p_median  # [K, L, d_ff]
    return stored[neurons.lang_index(spec.target), layer, idx].to(torch.float32)


def plan_layer(handle: ModelHandle, neurons: NeuronSet, spec: PatchSpec, layer: int,
               weight_edit: bool) -> _LayerPlan:
    """How ``spec`` patches ``layer``: down_proj column scales where exact, else gate-hook actions."""
    import torch

    weight = handle.adapter.site("mlp.down")[layer].weight
    masks = neurons.masks[spec.neuron_set][:, layer].bool()  # [K, d_ff]
    k = neurons.lang_index(spec.target)
    target = masks[k]
    chosen = [i for i, code in enumerate(neurons.languages) if i != k and (spec.others_langs is None or
                                                                           code in spec.others_langs)]
    others = masks[chosen].any(dim=0) & ~target  # a shared neuron is the target's
    groups = [(target, spec.op, spec.value, spec.source, spec.stat)]
    if spec.others_op is not None:
        groups.append((others, spec.others_op, spec.others_value, None, None))
    plan = _LayerPlan(layer, int(target.sum()), int(others.sum()) if spec.others_op is not None else 0)
    edit_idx, edit_scale = [], []
    for mask, op, value, source, stat in groups:
        idx = mask.nonzero().flatten()  # int64 [n], CPU
        if idx.numel() == 0 or _is_identity(op, value, source, stat):
            continue
        values = None if stat is not None else _stored_values(neurons, spec, idx, value, source, layer)
        if weight_edit and values is not None and (op == "mul" or (op == "set" and value == 0)):
            edit_idx.append(idx)
            edit_scale.append(values if op == "mul" else torch.zeros_like(values))
        else:
            plan.actions.append(_Action(idx.to(weight.device), op, None if values is None else
                                        values.to(device=weight.device, dtype=weight.dtype)))
    if edit_idx:
        plan.edit_idx, plan.edit_scale = torch.cat(edit_idx).to(weight.device), torch.cat(edit_scale).to(weight.device)
    return plan


def check_artifact(handle: ModelHandle, neurons: NeuronSet, spec: PatchSpec) -> None:
    """The neuron set fits the model and holds the spec's neuron set and target language."""
    adapter = handle.adapter
    if (neurons.n_layers, neurons.d_ff) != (adapter.n_layers, adapter.d_ff):
        raise UserError(f"the neuron set has {neurons.n_layers} layers x {neurons.d_ff} neurons but the "
                        f"model has {adapter.n_layers} x {adapter.d_ff}: identify neurons for this model first")
    if spec.neuron_set not in neurons.masks:
        raise UserError(f"patch.neuron_set={spec.neuron_set} is not in the neuron set: use one of "
                        f"{', '.join(neurons.masks)}")
    if spec.target not in neurons.languages:
        raise UserError(f"lang={spec.target} has no neurons in the neuron set: recorded languages are "
                        f"{' '.join(neurons.languages)}")


# --- the patch: a context manager ------------------------------------------------------------------------

class Patch:
    """``with Patch(handle, neurons, spec): ...`` patches the model inside the block, restores it on exit.

    ``weight_edit=False`` runs multiply and set-0 in the hook instead (for tests and benchmarks).
    """

    def __init__(self, handle: ModelHandle, neurons: NeuronSet, spec: PatchSpec, *,
                 weight_edit: bool = True) -> None:
        check_artifact(handle, neurons, spec)
        self.handle, self.neurons, self.spec, self.weight_edit = handle, neurons, spec, weight_edit
        self.layers = check_layers(spec.layers, handle.adapter.n_layers)
        all_plans = [plan_layer(handle, neurons, spec, layer, weight_edit) for layer in self.layers]
        self.neurons_per_layer = [0] * handle.adapter.n_layers  # target neurons patched in each layer
        self.others_per_layer = [0] * handle.adapter.n_layers
        for plan in all_plans:
            self.neurons_per_layer[plan.layer], self.others_per_layer[plan.layer] = (plan.target_neurons,
                                                                                     plan.others_neurons)
        self._plans = [plan for plan in all_plans if not plan.is_noop]
        self._uses_stat = any(a.values is None for p in self._plans for a in p.actions)
        self._statistics = None  # PrefillStatistics while a stat patch is active
        self._hooks: list = []  # torch hook handles, removed on exit
        self._saved_columns: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, idx, original [d_model, m])

    @property
    def reads_whole_rows(self) -> bool:
        """A test-time statistic is taken over each row's real tokens: scoring must feed whole rows."""
        return self._uses_stat

    @property
    def is_noop(self) -> bool:
        """Nothing to install: empty neuron set, factor 1, add 0, or no selected layer with neurons."""
        return not self._plans

    def summary(self) -> PatchSummary:
        """For run records: the label, neuron counts and how the patch runs."""
        return PatchSummary(patch=self.spec.describe(), layers=list(self.layers),
                            neurons=sum(self.neurons_per_layer), neurons_per_layer=list(self.neurons_per_layer),
                            others_neurons=sum(self.others_per_layer),
                            weight_edit_layers=sum(p.edit_idx is not None for p in self._plans),
                            hook_layers=sum(bool(p.actions) for p in self._plans))

    def __enter__(self) -> Patch:
        if self._hooks or self._saved_columns:
            raise RuntimeError("this Patch is already active; it cannot be entered twice at once")
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _install(self) -> None:
        import torch

        adapter = self.handle.adapter
        if self._uses_stat:  # the statistics need each call's attention mask and cache length
            from lsn_exp.teststat import PrefillStatistics

            self._statistics = PrefillStatistics(self.spec.stat, self.spec.coef)
            self._hooks.append(adapter.decoder.register_forward_pre_hook(self._statistics.capture_call,
                                                                         with_kwargs=True))
        for plan in self._plans:
            if plan.edit_idx is not None:
                weight = adapter.site("mlp.down")[plan.layer].weight  # [d_model, d_ff]
                with torch.no_grad():
                    original = weight[:, plan.edit_idx].clone()  # [d_model, m]
                    self._saved_columns.append((plan.layer, plan.edit_idx, original))
                    weight[:, plan.edit_idx] = (original.float() * plan.edit_scale).to(weight.dtype)
            if plan.actions:
                self._hooks.append(adapter.site("mlp.gate")[plan.layer].register_forward_hook(self._make_hook(plan)))
        self.handle.hooked.append(self)

    def _remove(self) -> None:
        import torch

        if self in self.handle.hooked:
            self.handle.hooked.remove(self)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        with torch.no_grad():
            for layer, idx, original in reversed(self._saved_columns):
                self.handle.adapter.site("mlp.down")[layer].weight[:, idx] = original  # bit-for-bit restore
        self._saved_columns, self._statistics = [], None

    def _make_hook(self, plan: _LayerPlan):
        """The gate-site hook of one layer (no host sync: shapes and Python ints only)."""
        import torch

        actions, layer, statistics = plan.actions, plan.layer, self._statistics
        needs_stat = any(a.values is None for a in actions)

        def hook(module, args, gate: torch.Tensor) -> torch.Tensor:  # gate: mlp.gate site [B, T, d_ff]
            stat = statistics(layer, gate) if needs_stat else None  # [B] float32
            if torch.is_grad_enabled():  # keep autograd's saved tensors intact
                gate = gate.clone()
            for action in actions:
                apply_action(gate, action, stat)
            return gate

        return hook


def apply_action(gate: torch.Tensor, action: _Action, stat: torch.Tensor | None) -> None:
    """In place on gate [B, T, d_ff]: op the neurons ``action.idx`` with [n] values or the [B] statistic."""
    value = action.values if action.values is not None else stat.to(gate.dtype)[:, None, None]  # [n] | [B,1,1]
    if action.op == "set":
        gate[..., action.idx] = value
    elif action.op == "add":
        gate[..., action.idx] = gate[..., action.idx] + value
    else:
        gate[..., action.idx] = gate[..., action.idx] * value


def _is_identity(op: str, value: float | None, source: str | None, stat: str | None) -> bool:
    """mul 1 and add 0 leave every activation as it is: install nothing, stay bit-identical."""
    return source is None and stat is None and ((op == "mul" and value == 1) or (op == "add" and value == 0))
