"""GradVac: gradient vaccine (Wang, Tsvetkov, Firat, Cao, ICLR 2021), on the Gramian."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import hparam, number, one_of
from mtlkit.methods.pcgrad import TINY, RandomOrder, check_orders, normalised
from mtlkit.methods.registry import register

#: ``p_i`` counts as zero (cosine 0, no correction) once ``||p_i||^2`` fell below this fraction of
#: the largest value it has had: below that, its Gramian-form norm is cancellation noise.
ZERO_P = 1e-14

EmaSource = Literal["current", "raw"]


def gradvac_coefficients(
    gramian: Tensor, orders: Tensor, targets: Tensor, *, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """GradVac's corrections from the Gramian: ``(C, phi)``, both (k, k) float64.

    Task i starts from ``p_i = g_i`` and visits the tasks ``j = orders[i, t] != i`` in turn:
    with ``phi = cos(p_i, g_j)`` (current ``p_i``, original ``g_j``) below the target
    ``phi_hat = targets[i, j]``, it adds the multiple of ``g_j`` that makes the cosine exactly
    ``phi_hat``: ``a = ||p_i|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j||
    sqrt(1 - phi_hat^2))``. ``p_i = sum_k C_ik g_k``; ``phi[i, j]`` is the cosine measured at the
    visit (the ports' EMA input), 0 on the diagonal, for a zero or tiny ``g_j`` (:data:`TINY`,
    skipped) and for a zero ``p_i``. Targets are capped at ``1 - eps``, which bounds the
    correction (``sqrt(1 - phi_hat^2) >= sqrt(eps)``) and leaves pairs that are parallel up to
    rounding alone.

    Norms and inner products come from ``M = C G`` and the running ``||p_i||^2``, as in
    :func:`~mtlkit.methods.pcgrad.pcgrad_coefficients`: the k vectors advance together.
    """
    check_orders(gramian, orders)
    k = gramian.shape[0]
    if targets.shape != (k, k):
        raise ValueError(f"Expected ({k}, {k}) target cosines; got {tuple(targets.shape)}.")
    g = normalised(gramian)
    device = g.device
    eye = torch.eye(k, dtype=torch.float64, device=device)
    measured = torch.zeros(k, k, dtype=torch.float64, device=device)
    if k < 2:
        return eye, measured
    diag = g.diagonal()
    usable = diag > TINY
    norm = diag.clamp_min(0).sqrt()
    orders = orders.to(device)
    rows = torch.arange(k, device=device)
    target = targets.to(device, torch.float64).clamp(-1.0, 1.0 - eps)
    visit = usable[orders] & (orders != rows[:, None])  # visit[i, t]: g_j can be corrected towards
    tgt = target[rows[:, None], orders]
    sin_tgt = (1.0 - tgt * tgt).clamp_min(0.0).sqrt()
    # a = ||p_i|| (tgt sin(phi) - phi sin(tgt)) * inv_den, inv_den = 1 / (||g_j|| sin(tgt)); 0: no visit
    inv_den = torch.where(visit & (sin_tgt > 0), 1.0 / (norm[orders] * sin_tgt).clamp_min(1e-300), 0.0)
    inv_gn = torch.where(visit, 1.0 / norm[orders].clamp_min(1e-300), 0.0)
    # step-major copies: row t holds, for every i, what task i needs at its t-th position
    tgt_t, sin_tgt_t, inv_den_t, inv_gn_t = (x.T.contiguous() for x in (tgt, sin_tgt, inv_den, inv_gn))
    diag_t = diag[orders].T.contiguous()
    orders_t = orders.T.contiguous()
    flat_t = (orders + rows[:, None] * k).T.contiguous()
    m = g.clone()
    m_flat = m.view(-1)
    sq = diag.clone()  # ||p_i||^2
    peak = sq.clone()  # the largest ||p_i||^2 so far: the scale of the cancellation noise in sq
    floor = peak * ZERO_P
    one = torch.ones(k, dtype=torch.float64, device=device)
    coef = torch.empty(k, k, dtype=torch.float64, device=device)  # coef[t, i]: added at step t
    phi_t = torch.empty(k, k, dtype=torch.float64, device=device)
    rows_of_g = torch.empty(k, k, dtype=torch.float64, device=device)
    for t in range(k):
        ip = m_flat.index_select(0, flat_t[t])  # <p_i, g_j>
        inv_pn = torch.where(sq > floor, sq.rsqrt(), 0.0)  # 1 / ||p_i||, 0 for a zero p_i
        p_norm = sq * inv_pn
        phi = phi_t[t]
        torch.mul(ip, inv_pn, out=phi).mul_(inv_gn_t[t]).clamp_(-1.0, 1.0)
        sin_phi = torch.addcmul(one, phi, phi, value=-1.0).clamp_min_(0.0).sqrt_()
        # sin(theta - theta_hat) > 0 exactly when phi < phi_hat: the clamp is the test
        a = coef[t]
        torch.mul(tgt_t[t], sin_phi, out=a).addcmul_(phi, sin_tgt_t[t], value=-1.0).clamp_min_(0.0)
        a.mul_(p_norm).mul_(inv_den_t[t])
        sq.addcmul_(a, torch.addcmul(ip, a, diag_t[t], value=0.5), value=2.0).clamp_min_(0.0)
        torch.maximum(peak, sq, out=peak)
        torch.mul(peak, ZERO_P, out=floor)
        if t + 1 < k:
            torch.index_select(g, 0, orders_t[t], out=rows_of_g)
            m.addcmul_(a.unsqueeze(1), rows_of_g)
    measured.scatter_(1, orders, phi_t.T)
    measured.fill_diagonal_(0.0)
    return eye.scatter_add_(1, orders, coef.T), measured


def raw_cosines(gramian: Tensor) -> Tensor:
    """Pairwise cosines of the task gradients (0 with a zero or tiny gradient), diagonal 0."""
    g = normalised(gramian)
    diag = g.diagonal()
    usable = diag > TINY
    inv = torch.where(usable, 1.0 / diag.clamp_min(1e-300).sqrt(), 0.0)
    cos = (g * inv[:, None] * inv[None, :]).clamp(-1.0, 1.0)
    return cos.fill_diagonal_(0.0)


@register("gradvac")
class GradVac(RandomOrder, GramianWeighting):
    """GradVac: Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models", ICLR 2021.

    PCGrad with adaptive targets: every ordered pair of tasks keeps a target cosine ``phi_hat_ij``
    (an EMA, initially 0). Task i visits the other tasks in a random order; when the cosine
    ``phi`` between its current ``p_i`` and ``g_j`` is below the target, ``p_i`` gets the
    multiple of ``g_j`` that raises the cosine exactly to the target (the law of sines in the
    plane of ``p_i`` and ``g_j``); then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``
    (corrected or not). ``d = sum_i p_i``. With all targets 0 a step is exactly PCGrad's
    (``skip_self=True``, same ``seed``: the same orders). Computed on the Gramian alone
    (:func:`gradvac_coefficients`), as TorchJD does; the targets are a K x K buffer, indexed by the
    tasks present in the step (pairs with an unlabelled task keep their target).

    Defaults (no official code was released): ``beta=0.5`` and ``eps=1e-8`` as LibMTL
    (``GradVac_beta`` in its config.py) and TorchJD; the paper reports ``beta = 1e-2`` (not
    re-verified). ``ema_source="current"``: the EMA is fed the cosine measured with the partially
    corrected ``p_i``, as in both ports; ``"raw"`` feeds ``cos(g_i, g_j)``, the paper's EMA as
    recalled in the spec (not re-verified). Heads get their own gradient (LibMTL, TorchJD); the
    sum of the ``p_i``, no factor.

    Whole-model grouping only: LibMTL's ``GradVac_group_type`` 1 (per layer) and 2 (per parameter
    tensor), and TorchJD's grouping examples, run the procedure separately on each parameter group,
    which needs one Gramian per group from the engine and a direction that is no longer ``J^T w``
    with one ``w``; not offered yet.

    Departures from the ports: they add ``eps`` to the denominators of the cosine and of the
    correction, in absolute units, so their results depend on the gradients' scale (with norms
    around 1e-5 every cosine reads about 100 times too small and the corrections nearly vanish)
    and, at unit scale, the corrected cosine misses the target by about ``eps``; here cosines are
    exact and scale-free (weights and targets are invariant to the gradients' scale), and ``eps``
    caps the targets at ``1 - eps`` instead, which bounds the correction (in the ports only the
    ``eps`` in its denominator bounds it, near ``||p_i|| / eps``, as a target approaches 1) and
    keeps rounding from triggering corrections between duplicated tasks. A zero or tiny ``g_j``
    is skipped and a ``p_i`` cancelled to rounding noise is not corrected (cosine 0; the EMA
    still moves, as in the ports). The visiting order comes from the method's own generator
    (``seed``, checkpointed), not the global RNG.
    """

    head_grad: HeadGrad = hparam(
        "own", GramianWeighting._hparams["head_grad"].check, "heads get their own gradient (as LibMTL)"
    )
    beta: float = hparam(
        0.5, number(ge=0, le=1), "EMA rate of the target cosines (LibMTL, TorchJD: 0.5; the paper: 1e-2)"
    )
    eps: float = hparam(
        1e-8, number(gt=0, le=1), "targets are capped at 1 - eps, bounding the correction (see above)"
    )
    ema_source: EmaSource = hparam(
        "current",
        one_of("current", "raw"),
        "cosine fed to the EMA: of the partially corrected p_i (ports) or of the raw pair (paper)",
    )
    seed: int = hparam(0, number(ge=0, integer=True), "seed of the method's generator of visiting orders")
    phi_hat: Tensor

    def _build(self, tasks: TaskSet) -> None:
        k = len(tasks)
        self.register_buffer("phi_hat", torch.zeros(k, k, dtype=torch.float64))
        self._generator = torch.Generator().manual_seed(self.seed)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = len(gramian)
        if k == 1:
            return torch.ones(1, dtype=torch.float64, device=gramian.device)
        index = self.active_index if self.active_index is not None else torch.arange(k)
        held = index.to(self.phi_hat.device)
        old = self.phi_hat[held[:, None], held[None, :]].to(gramian.device, torch.float64)
        coef, measured = gradvac_coefficients(gramian, self._orders(k), old, eps=self.eps)
        seen = measured if self.ema_source == "current" else raw_cosines(gramian)
        new = (1.0 - self.beta) * old + self.beta * seen
        new.diagonal().copy_(old.diagonal())  # no target for a task with itself
        self.phi_hat[held[:, None], held[None, :]] = new.to(self.phi_hat)
        return coef.sum(0)
