"""DiBS-MTL: direction-based bargaining over unit task gradients (Murthy et al., 2025)."""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import hparam, none, number, one_of
from mtlkit.methods.registry import register

#: A gradient norm at or below this is "no direction": the task gets weight 0 (see the class doc).
_TINY = 1e-150


@overload
def dibs_weights(
    gram: Tensor, radius: float, step_size: float, steps: int, *, with_betas: Literal[False] = ...
) -> Tensor: ...


@overload
def dibs_weights(
    gram: Tensor, radius: float, step_size: float, steps: int, *, with_betas: Literal[True]
) -> tuple[Tensor, list[Tensor]]: ...


def dibs_weights(
    gram: Tensor, radius: float, step_size: float, steps: int, *, with_betas: bool = False
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """The DiBS-MTL weights ``w_k = sum_t beta_k^(t)`` from a K x K Gramian alone.

    The inner DiBS loop of the official code runs on a displacement ``delta`` in parameter space,
    starting at 0, towards the local preferred states ``p_k = -r u_k`` (``u_k = g_k / ||g_k||``):
    ``d_k = ||delta - p_k||``, ``beta_k = s d_k / ||g_k||``, ``delta <- delta - s sum_k d_k u_k``,
    stopping early once ``||delta|| > r``. Here ``delta = sum_j c_j u_j`` is kept as its
    coefficients ``c``, so with the cosine matrix ``C = D^-1 G D^-1`` (``D = diag ||g_k||``)
    every distance is ``||delta - p_k||^2 = c^T C c + 2 r (C c)_k + r^2`` and
    ``||delta||^2 = c^T C c``: no d-dimensional vector is ever formed.

    Args:
        gram: the Gramian ``G = J J^T`` (any float dtype and device; solved in float64 there).
        radius: ``r``, the distance of every preferred state.
        step_size: ``s``, the inner step.
        steps: ``T``, the most inner steps (the loop stops after the first step that leaves the
            ball of radius ``r``; that step's betas are kept, as in the official code).
        with_betas: also return the betas of every step taken.

    Returns:
        float64 weights (K,) on ``gram``'s device (and the list of per-step betas).
    """
    g = gram.detach().to(torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt()
    has_direction = norms > _TINY
    inv = torch.where(has_direction, 1.0 / norms.clamp_min(_TINY), torch.zeros_like(norms))
    cos = g * inv[:, None] * inv[None, :]
    cos.diagonal().copy_(has_direction.to(cos.dtype))  # exactly 1 (0 for a task without direction)
    r2 = radius * radius
    c = torch.zeros_like(norms)
    w = torch.zeros_like(norms)
    betas: list[Tensor] = []
    for t in range(steps):
        cc = cos @ c
        # a task without direction has a zero row in cos: its distance is ||delta|| (p_k = 0)
        dist = (c @ cc + 2 * radius * cc + r2 * cos.diagonal()).clamp_min(0).sqrt()
        beta = step_size * dist * inv
        w = w + beta
        betas.append(beta)
        c = c - step_size * dist * has_direction.to(dist.dtype)
        if t + 1 < steps and bool(c @ cos @ c > r2):  # early exit: delta left the ball
            break
    return (w, betas) if with_betas else w


@register("dibs_mtl")
class DiBSMTL(GramianWeighting):
    """DiBS-MTL: Murthy, Gupta, Karabag, Fridovich-Keil, Topcu, "DiBS-MTL: Transformation-Invariant
    Multitask Learning with Direction Oracles" (v2: "Monotonic Transformation Invariant
    Multi-task Learning"), arXiv 2509.23948, 2025. Official code: suryakmurthy/dibs-mtl.

    Cooperative bargaining in which only gradient *directions* enter: each task k prefers the
    point ``p_k = -r u_k`` (``u_k = g_k / ||g_k||``, radius ``r``); T steps of the DiBS iteration
    ``delta <- delta - s sum_k ||delta - p_k|| u_k`` from ``delta = 0`` (stopping after the step
    that leaves the ball ``||delta|| <= r``) record ``beta_k^(t) = s ||delta - p_k|| / ||g_k||``,
    and the loss ``sum_k w_k L_k`` with ``w_k = sum_t beta_k^(t)`` is back-propagated, so the
    shared gradient is ``s sum_t sum_k d_k^(t) u_k`` and head k gets ``w_k dL_k/dphi_k``. The
    loop runs on the Gramian alone (:func:`dibs_weights`). With ``T = 1`` the weights are the
    closed form ``w_k = s r / ||g_k||``: the update is ``s r`` times the sum of unit task
    gradients. Replacing ``L_k`` by ``h(L_k)`` with ``h' > 0`` (log, exp, powers) changes
    nothing: not the shared gradient (``w_k g_k = s d_k u_k``), not the head gradients (``w_k``
    picks up ``1/h'``), so not the clipped update nor the whole trajectory.

    Official defaults (``mtl/methods``): ``steps=1`` (the registered ``dibsmtl``, used by the
    toy and QM9 scripts) with ``s = 1e-2``; the multi-step class uses ``T = 5`` with ``s = r/5``
    (an older trainer: ``T = 10``, ``s = lr/10``; the MT10 code: ``s = r/T``), so
    ``step_size=None`` means 1e-2 at ``T = 1`` and ``r/T`` otherwise; the shared gradient norm
    is clipped to ``max_norm=1.0`` after the weighted backward; heads get the weighted gradient.

    Departures and choices:

    - ``radius``: the official trainer passes the optimiser's *current* learning rate as ``r``
      (after the scheduler). A method does not see the optimiser, so ``r`` is an option; its
      default 1e-3 is the official ``backward``'s own fallback learning rate. Set it to your
      learning rate to reproduce the official run (at ``T = 1`` it only scales the update by
      ``s r``; with Adam that scale is mostly normalised away, with SGD it is the step size).
    - ``scale``: an overall factor on the weights (it keeps the invariance). ``"unit"`` divides
      by ``s r T``, so that at ``T = 1`` the update is the plain sum of unit task gradients
      ``sum_k g_k/||g_k||`` (then clipped to ``max_norm``), an SGD-friendly size. Default 1.0.
    - The official norms are ``||g_k|| + 1e-10`` (multi-step) or ``||g_k||`` (one step: a zero
      gradient gives infinite weights). Here ``u_k = g_k/||g_k||`` exactly, and a task whose
      gradient is zero (norm <= 1e-150) has no direction: weight 0 (its head gets no gradient
      in that step under ``head_grad="weighted"``), instead of ``s d/1e-10`` or infinity. So the
      invariance is exact at every gradient scale, not only above 1e-10.
    - ``level="representation"`` (not in the official code) bargains over the directions of the
      gradients w.r.t. the shared representation.
    """

    steps: int = hparam(
        1, number(ge=1, integer=True), "inner DiBS steps T (official: 1 for 'dibsmtl', 5 multi-step)"
    )
    radius: float = hparam(
        1e-3,
        number(gt=0),
        "radius r of the local preferred states (official: the optimiser's current learning rate)",
    )
    step_size: float | None = hparam(
        None,
        number(gt=0) | none(),
        "inner step s; None: the official 1e-2 at steps=1 and radius/steps for steps > 1",
    )
    max_norm: float | None = hparam(
        1.0, number(gt=0) | none(), "clip the shared update's norm (official 1.0; None: no clipping)"
    )
    scale: float | Literal["unit"] = hparam(
        1.0,
        number(gt=0) | one_of("unit"),
        "overall factor on the weights; 'unit' divides by s*r*T (T=1: the sum of unit gradients)",
    )

    def inner_step(self) -> float:
        """The inner step ``s`` in use."""
        if self.step_size is not None:
            return float(self.step_size)
        return 1e-2 if self.steps == 1 else self.radius / self.steps

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        s = self.inner_step()
        w = dibs_weights(gramian, self.radius, s, self.steps)
        factor = 1.0 / (s * self.radius * self.steps) if self.scale == "unit" else float(self.scale)
        return w * factor
