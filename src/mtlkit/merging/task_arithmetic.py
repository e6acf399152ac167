"""Task Arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.merging.base import Merger, check_weights, register


@register("task_arithmetic")
class TaskArithmetic(Merger):
    """Task Arithmetic (Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi,
    "Editing Models with Task Arithmetic", ICLR 2023): ``theta_m = theta_0 + scaling * sum_t w_t
    tau_t`` with task vectors ``tau_t = theta_t - theta_0``.

    Args:
        scaling: lambda. The paper picks it on validation data; FusionBench fixes 0.3, mergekit
            uses 1.0 with per-model weights. mtlkit's default is 0.3; choose it on a validation
            callback rather than on test data.
        weights: per-expert weights ``w_t`` (mergekit's ``weight``; default 1).
    """

    def __init__(self, scaling: float = 0.3, weights: Sequence[float] | None = None) -> None:
        self.scaling = float(scaling)
        self.weights = None if weights is None else [float(w) for w in weights]

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        w = check_weights(self.weights, len(experts), "task_arithmetic")
        tau = torch.zeros_like(pretrained)
        for wi, e in zip(w, experts, strict=True):  # accumulated: one temporary, not T
            tau.add_(e - pretrained, alpha=wi)
        return tau.mul_(self.scaling).add_(pretrained)
