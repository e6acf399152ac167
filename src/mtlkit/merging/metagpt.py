"""MetaGPT: task arithmetic with closed-form, norm-proportional coefficients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging.base import Loader, Merger, register, task_vector

NORM_SCOPES = ("model", "tensor")


def norm_coefficients(squared_norms: Sequence[float]) -> list[float]:
    total = sum(squared_norms)
    if total == 0:
        return [1.0 / len(squared_norms)] * len(squared_norms)
    return [s / total for s in squared_norms]


@register("metagpt")
class MetaGPT(Merger):
    """MetaGPT (Zhou, Song, Wang, Chen, "MetaGPT: Merging Large Language Models Using Model
    Exclusive Task Arithmetic", EMNLP 2024): ``theta_m = theta_0 + sum_t lambda_t tau_t`` with
    ``lambda_t = ||tau_t||^2 / sum_k ||tau_k||^2``, the closed-form optimum of the paper's
    objective under its linearity and orthogonality assumptions; no data and no search.

    The coefficients sum to 1, so this is a norm-weighted average of the task vectors (not a sum
    with a small scale). ``norms="model"`` takes the norms over the whole model (a first pass;
    a third-party implementation does so), ``"tensor"`` per tensor; which one the paper means
    is not settled in the sources read, hence the switch.
    """

    def __init__(self, norms: str = "model") -> None:
        if norms not in NORM_SCOPES:
            raise unknown_name("norms", norms, NORM_SCOPES)
        self.norms = norms
        self._coefficients: list[float] | None = None

    @property
    def granularity(self) -> str:
        return "model" if self.norms == "model" else "tensor"

    def begin(self) -> None:
        self._coefficients = None

    def prepare(self, names: Sequence[str], pretrained: Loader | None, experts: Sequence[Loader]) -> None:
        if self.norms != "model":
            return
        if pretrained is None:
            raise ConfigError("metagpt needs the pretrained model.")
        squared = [0.0] * len(experts)
        for n in names:  # each pretrained tensor read once, not once per expert
            base = pretrained(n)
            for t, load in enumerate(experts):
                squared[t] += float(task_vector(load(n), base).pow(2).sum())
        self._coefficients = norm_coefficients(squared)

    def coefficients(self, taus: Sequence[Tensor]) -> list[float]:
        if self.norms == "model":
            if self._coefficients is None:
                raise ConfigError(
                    "metagpt(norms='model') merges through mk.merging.merge (it needs a pass over the model)."
                )
            return self._coefficients
        return norm_coefficients([float(t.pow(2).sum()) for t in taus])

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        taus = [e - pretrained for e in experts]
        lam = self.coefficients(taus)
        return pretrained + torch.stack([c * t for c, t in zip(lam, taus, strict=True)]).sum(0)
