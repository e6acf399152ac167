"""Weight averaging."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.merging.base import Merger, check_weights, register


@register("average")
class WeightAveraging(Merger):
    """Weight averaging ("model soup"; Wortsman et al., ICML 2022, for fine-tunes of one
    pretrained model): ``theta_m = sum_t w_t theta_t / sum_t w_t``, uniform by default. Equals
    Task Arithmetic with scale 1/T. The pretrained model is not needed."""

    uses_pretrained = False

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        self.weights = None if weights is None else [float(w) for w in weights]

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        w = check_weights(self.weights, len(experts), "average")
        total = sum(w)
        if total == 0:
            raise ValueError("average: the expert weights sum to 0.")
        acc = torch.zeros_like(experts[0])
        for wi, e in zip(w, experts, strict=True):
            acc.add_(e, alpha=wi)
        return acc.div_(total)
