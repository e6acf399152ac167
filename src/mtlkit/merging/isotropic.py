"""Iso-C and Iso-CTS: isotropic merging in the common (and task-specific) subspaces."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.merging.base import check_fraction, register
from mtlkit.merging.spectral import SpectralMerger, procrustes, svd


@register("iso_c")
class IsoC(SpectralMerger):
    """Iso-C (Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
    Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025).

    Per linear weight (2-D, or a 1x1 convolution kernel viewed as one): the summed task vector
    ``Delta = U S V^T`` has its spectrum replaced by the mean singular value,
    ``Delta_iso = mean(S) U V^T``; other tensors take the mean task vector.
    ``theta_m = theta_0 + scaling * Delta_iso``. Scaling: FusionBench's config 1.0 (its table used
    1.5); the paper picks it on validation.
    """

    def update(self, taus: list[Tensor]) -> Tensor:
        u, s, vh = svd(torch.stack(taus).sum(0))
        return s.mean() * (u @ vh)


def common_split(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """``(common directions, directions per task)``: the common share is ``fraction`` of the rank,
    adjusted so that the rest splits evenly over the tasks (as the official code rounds it)."""
    common = int(rank * fraction)
    specific_total = round((rank - common) / tasks) * tasks
    common = max(0, rank - specific_total)
    return common, (rank - common) // tasks


@register("iso_cts")
class IsoCTS(SpectralMerger):
    """Iso-CTS (Marczak et al., ICML 2025): isotropic merging in a common subspace (the top
    singular directions of the summed task vectors, ``common_fraction`` of the rank, 0.8 by
    default) plus, per task, the top directions of what its task vector keeps outside that
    subspace. The stacked left and right directions are made orthonormal by Procrustes and every
    singular value is set to their mean. Other tensors take the mean task vector.
    ``theta_m = theta_0 + scaling * Delta`` (scaling 1.0, FusionBench's config).
    """

    def __init__(self, common_fraction: float = 0.8, scaling: float = 1.0) -> None:
        super().__init__(scaling)
        self.common_fraction = check_fraction(common_fraction, "common_fraction", "iso_cts")

    def update(self, taus: list[Tensor]) -> Tensor:
        common, per_task = common_split(min(taus[0].shape), len(taus), self.common_fraction)
        u, s, vh = svd(torch.stack(taus).sum(0))
        uc, sc, vc = u[:, :common], s[:common], vh[:common]
        us, ss, vs = [], [], []
        for tau in taus:
            ut, st, vht = svd(tau - uc @ (uc.T @ tau))
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vs.append(vht[:per_task])
        u_all = procrustes(torch.cat([*us, uc], dim=1))
        v_all = procrustes(torch.cat([*vs, vc], dim=0).T)
        return torch.cat([*ss, sc]).mean() * (u_all @ v_all.T)
