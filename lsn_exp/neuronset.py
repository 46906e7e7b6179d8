"""The neuron set a stage patches or steers with: per language and layer, the selected neurons (lape, baseline,
random), their stored values (p_max, p_median), activation probabilities and residual means (DiffMean), and its
tensor form in the cache and in neuron folders. ``lsn_exp.identify`` builds it from a recording."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lsn_exp.errors import UserError


@dataclass
class NeuronSet:
    """Neuron sets and patch values for every recorded language. Masks are bool [K, L, d_ff]."""

    languages: list[str]
    masks: dict[str, torch.Tensor]  # set name -> bool [K, L, d_ff]
    p_max: torch.Tensor  # float32 [K, L, d_ff]: max over the stat sentences of the sentence-mean activation
    p_median: torch.Tensor  # float32 [K, L, d_ff]: lower median (50th of 100 sorted values)
    activation_prob: torch.Tensor  # float32 [K, L, d_ff]: count / tokens
    meta: dict = field(default_factory=dict)
    resid_mean: torch.Tensor | None = None  # float32 [K, L, d_model]: mean residual stream after each layer
    resid_norm: torch.Tensor | None = None  # float32 [K, L]: mean L2 norm of a token's residual there

    @property
    def n_layers(self) -> int:
        return self.p_max.shape[1]

    @property
    def d_ff(self) -> int:
        return self.p_max.shape[2]

    def lang_index(self, code: str) -> int:
        if code not in self.languages:
            raise KeyError(f"language {code} was not recorded; recorded: {' '.join(self.languages)}")
        return self.languages.index(code)

    def mask(self, set_name: str, code: str) -> torch.Tensor:
        """bool [L, d_ff]: the neurons of ``code`` in ``set_name``."""
        return self.masks[set_name][self.lang_index(code)]

    def neurons(self, set_name: str, code: str) -> list[torch.Tensor]:
        """Per layer, the int64 indices of ``code``'s neurons in ``set_name``."""
        return [row.nonzero().flatten() for row in self.mask(set_name, code)]

    def diffmean(self, code: str) -> torch.Tensor:
        """float32 [L, d_model]: the DiffMean vector of ``code`` at every layer: its mean residual minus the average
        of the other recorded languages' means (each language weighs the same, whatever its token count)."""
        if self.resid_mean is None:
            raise UserError("this neuron set holds no residual means (recorded before DiffMean vectors): "
                            "record again (the current identify stage stores them)")
        k = self.lang_index(code)
        others = self.resid_mean[torch.arange(len(self.languages)) != k]
        return self.resid_mean[k] - others.mean(dim=0)

    def counts_per_layer(self, set_name: str) -> torch.Tensor:
        """int64 [K, L]: how many neurons each language has in each layer."""
        return self.masks[set_name].sum(dim=2)


def artifact_to_tensors(art: NeuronSet) -> tuple[dict, dict]:
    tensors = {f"mask.{name}": mask for name, mask in art.masks.items()}
    tensors.update(p_max=art.p_max, p_median=art.p_median, activation_prob=art.activation_prob)
    tensors.update({k: v for k, v in (("resid_mean", art.resid_mean), ("resid_norm", art.resid_norm)) if v is not None})
    return tensors, {"languages": art.languages, **art.meta}


def artifact_from_tensors(tensors: dict, meta: dict) -> NeuronSet:
    masks = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.startswith("mask.")}
    meta = dict(meta)
    return NeuronSet(languages=meta.pop("languages"), masks=masks, p_max=tensors["p_max"],
                          p_median=tensors["p_median"], activation_prob=tensors["activation_prob"], meta=meta,
                          resid_mean=tensors.get("resid_mean"), resid_norm=tensors.get("resid_norm"))
