"""Model Stock: interpolate between the pretrained model and the experts' average by the angle
between their task vectors."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import ConfigError
from mtlkit.merging.base import Merger, register


@register("model_stock")
class ModelStock(Merger):
    """Model Stock (Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models",
    ECCV 2024), per tensor as mergekit does it: with ``c`` the mean pairwise cosine between the
    experts' task vectors and ``k`` experts, ``t = k c / (1 + (k - 1) c)`` and
    ``theta_m = t * mean_t theta_t + (1 - t) * theta_0``.

    Needs at least two experts. Departure: ``c`` is clipped to [0, 1] (a negative mean cosine
    would make ``t`` negative or undefined; clipping returns the pretrained tensor there).
    """

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        k = len(experts)
        if k < 2:
            raise ConfigError("model_stock needs at least two experts.")
        taus = [(e - pretrained).reshape(-1) for e in experts]
        cosines = []
        for a, b in itertools.combinations(taus, 2):
            denom = float(a.norm() * b.norm())
            cosines.append(float((a * b).sum()) / denom if denom > 0 else 0.0)
        c = min(1.0, max(0.0, sum(cosines) / len(cosines)))
        t = k * c / (1 + (k - 1) * c)
        return t * torch.stack(list(experts)).mean(0) + (1 - t) * pretrained
