"""IMTL-G: the impartial direction, equally projected on every unit task gradient (Liu et al., 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import hparam, number
from mtlkit.methods.registry import register

#: degenerate when ``1`` has no component in the span of the unit gradients (relative size below
#: this; e.g. two exactly opposite gradients) or ``|sum v| <= _DEGENERATE * ||v||_1``: no direction
#: with weights summing to 1 is impartial, and ``v / sum v`` would be noise or explode
_DEGENERATE = 1e-8


def impartial_weights(gramian: Tensor, rcond: float = 1e-10) -> tuple[Tensor, Tensor]:
    """IMTL-G's weights from a Gramian alone (closed form B, float64).

    The direction ``d = J^T w`` must have the same projection on every unit gradient
    ``u_k = g_k / n_k``: ``G w = c n``. Written with the unit gradients' Gramian
    ``Gn = N^-1 G N^-1`` (``N = diag(n)``) this is ``Gn y = c 1`` with ``w = N^-1 y``, so
    ``v = N^-1 Gn^+ 1`` and ``w = v / sum(v)`` (common projection ``1 / sum(v)``). For a
    nonsingular ``G`` this is exactly TorchJD's ``G^+ n``; taking the pseudo-inverse (``eigh``,
    eigenvalues ``<= rcond * lambda_max`` dropped) of ``Gn`` rather than ``G`` makes the rank
    decision depend on the directions only, so the result is exactly equivariant to per-task
    gradient scales (a task whose gradient is 1e12 times smaller is not truncated away). A zero
    gradient gets weight 0; duplicated tasks share their weight.

    Returns ``(w, degenerate)``: ``degenerate`` (a 0-dim bool tensor, no host sync) is set when no
    impartial direction with ``sum(w) = 1`` exists (``1`` has no component in the span of the unit
    gradients, e.g. two exactly opposite gradients; or ``|sum v| <= 1e-8 ||v||_1``); ``w`` is then
    the mean ``1/K``.
    """
    g = gramian.to(torch.float64)
    k = len(g)
    norms = g.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    lam, vecs = torch.linalg.eigh(g * inv[:, None] * inv[None, :])
    keep = lam > rcond * lam.max().clamp_min(0)
    coef = vecs.sum(0)  # V^T 1
    kept = torch.where(keep, coef, torch.zeros_like(coef))
    v = inv * (vecs @ (kept / torch.where(keep, lam, 1.0)))
    total = v.sum()
    degenerate = (kept.norm() <= _DEGENERATE * k**0.5) | (total.abs() <= _DEGENERATE * v.abs().sum())
    w = torch.where(degenerate, torch.full_like(v, 1.0 / k), v / torch.where(degenerate, 1.0, total))
    return w, degenerate


@register("imtl_g")
class IMTLG(GramianWeighting):
    """IMTL-G, the gradient-balancing half of Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang,
    "Towards Impartial Multi-task Learning", ICLR 2021.

    The shared direction ``d = J^T w`` with ``sum(w) = 1`` has the same projection on every unit
    task gradient ``u_k = g_k / ||g_k||`` (no task is favoured, whatever the gradient norms). The
    paper's closed form (form A, with the differences ``g_1 - g_k`` and ``u_1 - u_k``, as in
    LibMTL and nash-mtl) is replaced by the Gramian-only form B (TorchJD's generalisation),
    ``w = G^+ s / sum(G^+ s)`` with ``s_k = ||g_k||``, evaluated through the unit gradients'
    Gramian (:func:`impartial_weights`): all three agree on linearly independent gradients, and
    form B stays finite for a zero gradient (0/0 in form A), duplicated tasks (a singular matrix
    in form A; nash-mtl then adds ``1e-8 I``) and one task. For linearly dependent gradients
    where no impartial direction exists, it is the least-squares one (as TorchJD's), but the
    pseudo-inverse is that of the unit gradients' Gramian, so that the result depends on the
    gradient directions and not on which norms are small (TorchJD's ``G^+`` with a relative
    tolerance would drop a task whose gradient is many orders of magnitude smaller).

    The weights are not constrained to be non-negative, and the common projection
    ``1 / sum(G^+ s)`` may be negative, as in the paper's form. When no impartial direction with
    weights summing to 1 exists (two exactly opposite gradients, or ``sum(G^+ s)`` vanishing) this
    step uses the mean weights ``1/K`` and sets ``StepInfo.extras["degenerate"]`` (a bool tensor),
    where TorchJD returns zero weights (no shared update) and form A divides by zero. No
    hyper-parameters in the paper; ``rcond`` is ours. Heads get the weighted gradient (nash-mtl's backward of
    ``sum_k w_k L_k``, whose IMTL-G port is the one behind the published tables); LibMTL gives
    them their own (``head_grad="own"``). The gradients are taken w.r.t. the shared parameters as
    in nash-mtl; the paper's setting is ``level="representation"`` (elementwise over the batch).
    """

    rcond: float = hparam(
        1e-10,
        number(gt=0, le=1),
        "eigenvalues of the Gramian below rcond * the largest are dropped in its pseudo-inverse",
    )

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        w, degenerate = impartial_weights(gramian, self.rcond)
        self.report(degenerate=degenerate.detach())
        return w
