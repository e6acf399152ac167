"""Aligned-MTL: align the task gradients into an orthogonal, equal-norm system (Senushkin et al., 2023)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import hparam, one_of
from mtlkit.methods.registry import register, register_variant

ScaleMode = Literal["min", "median", "rmse"]
Reduction = Literal["sum", "mean"]

#: the official rank tolerance uses the default (float32) machine epsilon, whatever the dtype
_EPS32 = torch.finfo(torch.float32).eps


def balance_transform(gramian: Tensor, scale_mode: ScaleMode = "min") -> tuple[Tensor, Tensor]:
    """Aligned-MTL's balance transform ``B = sqrt(sigma) V_R diag(lambda_R)^(-1/2) V_R^T`` of a
    Gramian ``G = V diag(lambda) V^T`` (float64 ``eigh``), and the numerical rank ``R``.

    The kept eigenpairs are those with ``lambda > K * eps_float32 * lambda_max`` (the official
    tolerance, float32's epsilon even for a float64 Gramian); ``sigma`` is the smallest kept
    eigenvalue (``"min"``), their median (``"median"``, the lower middle one for an even count, as
    ``torch.median``) or their mean (``"rmse"``). Then ``B G B = sigma P_R`` (``P_R`` the projector
    on the kept eigenvectors): the aligned gradients ``B J`` are orthogonal with equal norms
    ``sqrt(sigma)``. An all-zero Gramian (R = 0) gives the identity (TorchJD's choice; every
    gradient is zero then, so the direction is zero whatever ``B``).
    """
    g = gramian.to(torch.float64)
    k = len(g)
    lam, vecs = torch.linalg.eigh(g)  # ascending
    tol = lam.max() * k * _EPS32
    keep = lam > tol
    rank = keep.sum()
    if not bool(rank > 0):  # a host sync, as the official code's slicing by the rank
        return torch.eye(k, dtype=torch.float64, device=g.device), rank
    kept = lam[keep]
    if scale_mode == "min":
        sigma = kept.min()
    elif scale_mode == "median":
        sigma = kept.median()
    else:
        sigma = kept.mean()
    inv_sqrt = torch.where(keep, lam.clamp_min(tol).rsqrt(), torch.zeros_like(lam))
    return sigma.sqrt() * (vecs * inv_sqrt) @ vecs.T, rank


@register("aligned_mtl")
class AlignedMTL(GramianWeighting):
    """Aligned-MTL: Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023.

    The task gradients are replaced by the aligned system ``B J`` (:func:`balance_transform`),
    whose rows are orthogonal with equal norms ``sqrt(sigma)`` (condition number 1), and summed:
    ``d = J^T (B 1)``. ``sigma`` is the smallest kept eigenvalue of the Gramian by default
    (``scale_mode="min"``; ``"median"``, ``"rmse"`` = the mean eigenvalue, are the official
    alternatives). ``reduction="sum"`` (``w = B 1``) is the official code and LibMTL; ``"mean"``
    (``w = B 1 / K``) is TorchJD's default preference vector. Heads get their own gradient, as in
    the official code (its ``scale_decoder_grad=True`` is ``head_grad="weighted"``). The registry
    name ``aligned_mtl_ub`` is the official Aligned-MTL-UB: the same transform of the gradients
    w.r.t. the shared representation (elementwise over the batch), then one trunk backward.

    Defaults from the official code (SamsungLabs/MTL). Departures: ``torch.linalg.eigh`` in
    float64 (the official ``torch.symeig`` no longer exists); the rank tolerance
    ``K * eps_float32 * lambda_max`` is kept as in the official code and TorchJD, so eigenvalues
    below ~1e-7 of the largest count as zero even for exact float64 gradients. The method is
    discontinuous where the rank changes (``sigma`` jumps to the next eigenvalue); the rank is in
    ``StepInfo.extras["rank"]``. Rank 0 (all gradients zero) gives ``w = 1`` (``1/K``).
    """

    scale_mode: ScaleMode = hparam(
        "min",
        one_of("min", "median", "rmse"),
        "sigma, the common squared norm of the aligned gradients: the smallest kept eigenvalue "
        "of the Gramian (official default), their median, or their mean ('rmse')",
    )
    reduction: Reduction = hparam(
        "sum",
        one_of("sum", "mean"),
        "sum of the aligned gradients (official, LibMTL) or their mean (TorchJD)",
    )
    head_grad: HeadGrad = hparam(
        "own",
        GramianWeighting._hparams["head_grad"].check,
        "heads get their own gradient (official) or the weighted one (official scale_decoder_grad)",
    )

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        b, rank = balance_transform(gramian, self.scale_mode)
        self.report(rank=rank.detach())
        w = b.sum(1)
        return w / len(w) if self.reduction == "mean" else w


register_variant("aligned_mtl_ub", AlignedMTL, level="representation")
