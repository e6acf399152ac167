"""Linear algebra shared by the spectral merging methods (TSV-M, Iso-C, Iso-CTS)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging.base import Merger


def svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``m = U diag(S) Vh``."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s, vh


def procrustes(m: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows, when wider than tall): ``P Q^T`` from
    ``m = P S Q^T`` (orthogonal Procrustes)."""
    p, _, qh = svd(m)
    return p @ qh


def is_matrix(t: Tensor) -> bool:
    """The spectral methods act on linear maps: 2-D weights, and 1x1 convolution kernels
    (out, in, 1, 1), which are the same map applied at every position. Treating the latter as
    matrices is our extension (the papers and FusionBench work on ViTs, which have none); every
    other tensor gets the mean task vector. A kernel with one input or one output channel is a
    per-channel scale, not a map between spaces, and is not a matrix here; a grouped 1x1 kernel
    cannot be told from its shape and would be treated as dense: leave such models to the 2-D path
    by merging with a method that does not factorise."""
    if t.dim() == 2:
        return True
    return t.dim() == 4 and tuple(t.shape[2:]) == (1, 1) and t.shape[0] > 1 and t.shape[1] > 1


def as_matrix(t: Tensor) -> Tensor:
    """A linear map's weight as (out, in) (a view of a 1x1 kernel)."""
    return t.reshape(t.shape[0], -1)


def mean_update(pretrained: Tensor, taus: Sequence[Tensor], scaling: float) -> Tensor:
    """``theta_0 + scaling * mean_t tau_t``: what the spectral methods give tensors that are not
    2-D weights."""
    return pretrained + scaling * torch.stack(list(taus)).mean(0)


#: what a per-matrix optimiser (WUDI, DOGE) gives the tensors it does not optimise
OTHERS = ("pretrained", "mean")


class MatrixSelection:
    """The linear weights a per-matrix optimiser (WUDI, DOGE) works on: every :func:`is_matrix`
    tensor whose name matches the regular expression ``select`` (all when ``None``); the others get
    ``theta_0`` (``others="pretrained"``) or the mean task vector (``"mean"``)."""

    def __init__(self, method: str, select: str | None, others: str) -> None:
        if others not in OTHERS:
            raise unknown_name("others", others, OTHERS)
        try:
            self.pattern = re.compile(select) if select is not None else None
        except re.error as exc:
            raise ConfigError(f"{method}: select is not a regular expression: {exc}") from exc
        self.others = others

    def chosen(self, name: str, t: Tensor) -> bool:
        return is_matrix(t) and (self.pattern is None or self.pattern.search(name) is not None)

    def other(self, pretrained: Tensor, experts: Sequence[Tensor]) -> Tensor:
        if self.others == "pretrained":
            return pretrained
        return mean_update(pretrained, [e - pretrained for e in experts], 1.0)


class SpectralMerger(Merger):
    """The frame the spectral methods share: a linear weight (:func:`is_matrix`) becomes
    ``theta_0 + scaling * update(task vectors as (out, in) matrices)``, reshaped back to its
    shape; every other tensor takes :func:`mean_update`. Subclasses implement :meth:`update`."""

    def __init__(self, scaling: float = 1.0) -> None:
        self.scaling = float(scaling)

    def update(self, taus: list[Tensor]) -> Tensor:
        """The merged (out, in) update from the task vectors of one linear weight."""
        raise NotImplementedError

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        taus = [e - pretrained for e in experts]
        if not is_matrix(pretrained):
            return mean_update(pretrained, taus, self.scaling)
        return pretrained + self.scaling * self.update([as_matrix(t) for t in taus]).reshape(pretrained.shape)
