"""Linear algebra shared by the spectral merging methods (TSV-M, Iso-C, Iso-CTS)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
    """The spectral methods act on 2-D weights; everything else is averaged."""
    return t.dim() == 2


def mean_update(pretrained: Tensor, taus: Sequence[Tensor], scaling: float) -> Tensor:
    """``theta_0 + scaling * mean_t tau_t``: what the spectral methods give tensors that are not
    2-D weights."""
    return pretrained + scaling * torch.stack(list(taus)).mean(0)
