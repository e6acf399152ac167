"""TSV-M: merging in decorrelated task-singular-vector subspaces."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.merging.base import register
from mtlkit.merging.spectral import SpectralMerger, procrustes, svd


@register("tsv")
class TSVMerge(SpectralMerger):
    """TSV-M (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular
    Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

    Per linear weight of rank r (2-D, or a 1x1 convolution kernel viewed as one): keep each task
    vector's top ``k = floor(r / T)`` singular triplets (at least one), stack the kept left and
    right singular vectors of every task, make each stack orthonormal by orthogonal Procrustes
    (removing the interference between the tasks' subspaces), and recombine with the kept
    singular values: ``tau_m = U_perp diag(S) V_perp^T``. Other tensors take the mean task vector.
    ``theta_m = theta_0 + scaling * tau_m`` (FusionBench's default scaling 1.0).
    """

    def update(self, taus: list[Tensor]) -> Tensor:
        k = max(1, min(taus[0].shape) // len(taus))
        us, ss, vs = [], [], []
        for tau in taus:
            u, s, vh = svd(tau)
            us.append(u[:, :k])
            ss.append(s[:k])
            vs.append(vh[:k].T)
        u_perp = procrustes(torch.cat(us, dim=1))
        v_perp = procrustes(torch.cat(vs, dim=1))
        return (u_perp * torch.cat(ss)) @ v_perp.T
