"""Model Breadcrumbs: drop each task vector's smallest and largest entries per tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import ConfigError
from mtlkit.merging.base import Merger, check_fraction, check_weights, register


def breadcrumb_mask(tau: Tensor, bottom: float, top: float, density: float | None = None) -> Tensor:
    """True for the entries kept: all but the floor(bottom * n) smallest and the floor(top * n)
    largest magnitudes (ties broken by a stable sort). With ``density`` (mergekit's
    parameterisation) int(density * n) entries are kept after removing int(top * n) from the top,
    fewer from the top when both do not fit, and everything when density >= 1."""
    n = tau.numel()
    order = torch.argsort(tau.abs().reshape(-1), stable=True)
    keep = torch.ones(n, dtype=torch.bool)
    if density is not None:
        if density >= 1:
            return keep.reshape(tau.shape)
        high = int(top * n)
        low = n - int(density * n) - high
        if low < 0:
            high, low = high + low, 0
    else:
        low, high = math.floor(bottom * n), math.floor(top * n)
    keep[order[:low]] = False
    if high:
        keep[order[n - high :]] = False
    return keep.reshape(tau.shape)


@register("breadcrumbs")
class Breadcrumbs(Merger):
    """Model Breadcrumbs (Davari, Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
    with Sparse Masks", ECCV 2024): per tensor, each task vector loses the ``bottom`` fraction of
    its entries with the smallest magnitude (noise) and the ``top`` fraction with the largest
    (outliers); ``theta_m = theta_0 + scaling * sum_t w_t mask_t * tau_t``.

    Defaults are the author's best for 8 ViT-B/32 tasks (bottom 0.1, top 0.01, scaling 1).
    ``density`` switches to mergekit's parameterisation (the kept fraction, with ``top`` removed
    from the top first); it then replaces ``bottom``.
    """

    def __init__(
        self,
        bottom: float = 0.1,
        top: float = 0.01,
        scaling: float = 1.0,
        weights: Sequence[float] | None = None,
        density: float | None = None,
    ) -> None:
        self.density = None if density is None else check_fraction(density, "density", "breadcrumbs")
        self.bottom = check_fraction(bottom, "bottom", "breadcrumbs")
        self.top = check_fraction(top, "top", "breadcrumbs")
        if self.bottom + self.top >= 1.0:
            raise ConfigError("breadcrumbs: bottom + top must leave something (sum below 1).")
        self.scaling = float(scaling)
        self.weights = None if weights is None else [float(w) for w in weights]

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        w = check_weights(self.weights, len(experts), "breadcrumbs")
        kept = []
        for wi, e in zip(w, experts, strict=True):
            tau = e - pretrained
            mask = breadcrumb_mask(tau, self.bottom, self.top, self.density)
            kept.append(wi * torch.where(mask, tau, torch.zeros_like(tau)))
        return pretrained + self.scaling * torch.stack(kept).sum(0)
