"""FULLER's intra-gradient (modality-level) calibration: equal gradient magnitudes for the
branches that meet at a fusion, applied inside the backward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.core.distributed import DataParallel
from mtlkit.errors import ConfigError


class _Equalize(torch.autograd.Function):
    """Identity forward; backward rescales each input's gradient to a common norm when the
    owning :class:`ModalityGradientCalibration` is active (read at backward time)."""

    @staticmethod
    def forward(ctx: Any, owner: ModalityGradientCalibration, *features: Tensor) -> tuple[Tensor, ...]:
        ctx.owner = owner
        return tuple(f.view_as(f) for f in features)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        owner: ModalityGradientCalibration = ctx.owner
        return (None, *owner.calibrate(list(grads)))


class ModalityGradientCalibration(nn.Module):
    """FULLER's intra-gradient (modality-level) calibration, placed where the modality branches
    meet the fusion: the forward pass is the identity; in a backward pass while :meth:`active`,
    the gradient reaching each branch is rescaled to a common magnitude ``c`` (its direction
    kept): ``q_m <- q_m * c / ||q_m||``, with ``c`` the mean of the branch norms (``target="mean"``,
    which keeps their total) or the largest (``"max"``). One norm per branch over the whole batch
    (per step, not per sample).

    Inactive (the default), it changes nothing, so a model carrying it trains as usual under any
    other method; the ``fuller`` method switches it on around its single trunk backward. The last
    calibrated backward's branch norms (before and after) are kept in :attr:`last_norms`.
    """

    def __init__(self, target: str = "mean", eps: float = 1e-12) -> None:
        super().__init__()
        if target not in ("mean", "max"):
            raise ConfigError(f"target must be 'mean' or 'max', got {target!r}.")
        self.target = target
        self.eps = eps
        self._active = False
        self._parallel: DataParallel | None = None
        self.last_norms: tuple[list[float], list[float]] | None = None

    @contextmanager
    def active(self, parallel: DataParallel | None = None) -> Iterator[None]:
        """Calibrate the backward passes run inside this block (under DDP, ``parallel`` makes the
        branch norms those of the global batch)."""
        before = (self._active, self._parallel)
        self._active, self._parallel = True, parallel
        try:
            yield
        finally:
            self._active, self._parallel = before

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        return _Equalize.apply(self, *features)

    def calibrate(self, grads: list[Tensor]) -> list[Tensor]:
        if not self._active or len(grads) < 2:
            return grads
        squares = torch.stack([torch.linalg.vector_norm(g.double()).square() for g in grads])
        if self._parallel is not None:  # a norm over the global batch: sum the ranks' squares
            self._parallel.sum_(squares)
        norms = squares.sqrt()
        target = norms.mean() if self.target == "mean" else norms.max()
        scale = torch.where(norms > self.eps, target / norms.clamp_min(self.eps), torch.ones_like(norms))
        out = [g * s.to(g.dtype) for g, s in zip(grads, scale, strict=True)]
        self.last_norms = (norms.tolist(), (norms * scale).tolist())
        return out
