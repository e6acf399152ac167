"""TSV-M: merging in decorrelated task-singular-vector subspaces."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.merging.base import Merger, register
from mtlkit.merging.spectral import as_matrix, is_matrix, mean_update, procrustes, svd


@register("tsv")
class TSVMerge(Merger):
    """TSV-M (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular
    Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

    Per linear weight of rank r (2-D, or a 1x1 convolution kernel viewed as one): keep each task vector's top ``k = floor(r / T)`` singular triplets
    (at least one), stack the kept left and right singular vectors of every task, make each
    stack orthonormal by orthogonal Procrustes (removing the interference between the tasks'
    subspaces), and recombine with the kept singular values:
    ``tau_m = U_perp diag(S) V_perp^T``. Other tensors take the mean task vector.
    ``theta_m = theta_0 + scaling * tau_m`` (FusionBench's default scaling 1.0).
    """

    def __init__(self, scaling: float = 1.0) -> None:
        self.scaling = float(scaling)

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        taus = [e - pretrained for e in experts]
        if not is_matrix(pretrained):
            return mean_update(pretrained, taus, self.scaling)
        taus = [as_matrix(t) for t in taus]
        k = max(1, min(taus[0].shape) // len(taus))
        us, ss, vs = [], [], []
        for tau in taus:
            u, s, vh = svd(tau)
            us.append(u[:, :k])
            ss.append(s[:k])
            vs.append(vh[:k].T)
        u_perp = procrustes(torch.cat(us, dim=1))
        v_perp = procrustes(torch.cat(vs, dim=1))
        return pretrained + self.scaling * ((u_perp * torch.cat(ss)) @ v_perp.T).reshape(pretrained.shape)
