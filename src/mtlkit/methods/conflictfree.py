"""ConFIG: the conflict-free update at equal angles to every task gradient (Liu, Chu, Thuerey, 2025)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import hparam, none, number, numbers, one_of
from mtlkit.methods.registry import register

LengthModel = Literal[
    "projection", "track_min", "track_max", "track_harmonic", "track_arithmetic", "track_geometric"
]

#: ``p`` is taken to have no component in the span of the unit gradients (so that no direction
#: makes the requested angles; e.g. two exactly opposite gradients) below this relative size
_NO_DIRECTION = 1e-8


def conflictfree_weights(
    gramian: Tensor, pref: Tensor, length: LengthModel = "projection", rcond: float = 1e-10
) -> tuple[Tensor, Tensor, Tensor]:
    """ConFIG's direction as weights ``d = J^T w``, from the Gramian alone (float64).

    With ``n_k = ||g_k||``, unit gradients ``u_k = g_k / n_k`` (0 for a zero gradient) and their
    Gramian ``Gn = N^-1 G N^-1``, the minimum-norm least-squares solution of ``U x = p`` is
    ``x = U^T c`` with ``c = Gn^+ p`` (pseudo-inverse by ``eigh``, eigenvalues
    ``<= rcond * lambda_max`` dropped), i.e. ``x = J^T (c / n)``. The update is
    ``d = length * x / ||x||`` where the length is ``sum_k <g_k, x/||x||>`` (``"projection"``, the
    official default) or ``T * sum_k <u_k, x/||x||>`` with ``T`` the min/max/harmonic/arithmetic/
    geometric mean of the gradient norms (the official ``Track*`` length models).

    Returns ``(w, min_cosine, no_direction)``: ``min_k cos(g_k, d)`` (0 for a zero gradient or a
    zero update; negative when the angles were not attainable, K > rank(J)), and a flag set when
    ``p`` has no component in the span of the unit gradients (exactly opposite gradients): no
    direction exists, and ``w = 0`` (``d = 0``, as TorchJD's normalisation of a zero vector).
    """
    g = gramian.to(torch.float64)
    p = pref.to(g)
    norms = g.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    gn = g * inv[:, None] * inv[None, :]
    lam, vecs = torch.linalg.eigh(gn)
    keep = lam > rcond * lam.max().clamp_min(0)
    coef = vecs.T @ p
    c = vecs @ torch.where(keep, coef / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    in_span = torch.where(keep, coef, torch.zeros_like(coef)).norm()
    no_direction = in_span <= _NO_DIRECTION * p.norm()
    proj = gn @ c  # <u_k, x>
    xx = (c @ proj).clamp_min(0)  # ||x||^2
    # sum_k <g_k, x> (projection), or T * sum_k <u_k, x>
    total = (norms * proj).sum() if length == "projection" else _tracked(norms, length) * proj.sum()
    zero = no_direction | (xx <= 0)
    w = torch.where(zero, torch.zeros_like(c), c * inv * (total / torch.where(zero, 1.0, xx)))
    gw = g @ w
    dnorm = (w @ gw).clamp_min(0).sqrt()
    denom = norms * dnorm
    cos = torch.where(denom > 0, gw / denom.clamp_min(1e-300), torch.zeros_like(gw))
    return w, cos.min(), no_direction


def _tracked(norms: Tensor, length: LengthModel) -> Tensor:
    if length == "track_min":
        return norms.min()
    if length == "track_max":
        return norms.max()
    if length == "track_arithmetic":
        return norms.mean()
    if length == "track_harmonic":  # a zero norm makes it 0, as 1/0 = inf in the official code
        return len(norms) / (1.0 / norms).sum()
    return torch.exp(torch.log(norms).mean())  # track_geometric (no underflow of the product)


@register("conflictfree")
class ConFIG(GramianWeighting):
    """ConFIG: Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", ICLR 2025 (registry name ``conflictfree``, the official package's name).

    The direction ``x`` solves ``<u_k, x> = p_k`` for the unit task gradients ``u_k`` in the
    minimum-norm least-squares sense, so with ``p = 1`` (the official ``EqualWeight``) every task
    gradient makes the same positive angle with the update when the gradients are independent
    (no task's loss increases to first order); the update is ``x`` rescaled to the sum of the
    projections of the task gradients on it (the official ``ProjectionLength``). Computed from
    the Gramian alone (:func:`conflictfree_weights`): ``d = J^T w``.

    Defaults from the official ``conflictfree`` package (``ConFIGOperator``): equal weights,
    projection length; heads get their own gradient (the official multi-task experiments).
    Departures: a float64 pseudo-inverse of the normalised K x K Gramian (relative ``rcond``)
    instead of the official least-squares solve on the K x d matrix of unit gradients (the same
    minimum-norm solution, which some GPU least-squares drivers do not return for rank-deficient
    inputs), and no special two-task formula (the official ``ConFIG_update_double`` gives the same
    bisector). When no direction exists (two exactly opposite gradients) the update is zero and
    ``StepInfo.extras["degenerate"]`` is set; ``extras["min_cosine"]`` is ``min_k cos(g_k, d)``
    (negative only when K > rank(J), where equal angles are not attainable). Not implemented:
    the momentum variant M-ConFIG and loss-dependent weight models.
    """

    pref: Sequence[float] | None = hparam(
        None,
        numbers(number(gt=0)) | none(),
        "the target <u_k, x> per task, p_k > 0 (default 1: equal angles)",
    )
    length_model: LengthModel = hparam(
        "projection",
        one_of(
            "projection", "track_min", "track_max", "track_harmonic", "track_arithmetic", "track_geometric"
        ),
        "length of the update: the sum of the projections of the task gradients on it (official "
        "default), or the sum of the unit gradients' projections times a mean of the gradient norms",
    )
    head_grad: HeadGrad = hparam(
        "own", GramianWeighting._hparams["head_grad"].check, "heads get their own gradient (official)"
    )
    rcond: float = hparam(
        1e-10,
        number(gt=0, le=1),
        "eigenvalues of the unit gradients' Gramian below rcond * the largest are dropped",
    )

    def _build(self, tasks: TaskSet) -> None:
        if self.pref is not None and len(self.pref) != len(tasks):
            raise ConfigError(f"ConFIG got {len(self.pref)} preferences for {len(tasks)} tasks.")

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        a = len(gramian)
        if self.pref is None:
            p = torch.ones(a, dtype=torch.float64, device=gramian.device)
        else:
            index = self.active_index if self.active_index is not None else torch.arange(a)
            p = torch.tensor(list(self.pref), dtype=torch.float64)[index.cpu()].to(gramian.device)
        w, min_cos, none_exists = conflictfree_weights(gramian, p, self.length_model, self.rcond)
        self.report(min_cosine=min_cos.detach(), degenerate=none_exists.detach())
        return w
