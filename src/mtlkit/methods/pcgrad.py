"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020), on the Gramian."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import boolean, hparam, number, one_of
from mtlkit.methods.owned_generator import OwnedGenerator
from mtlkit.methods.registry import register

#: A task gradient with ``||g_j||^2 <= TINY * max_k ||g_k||^2`` is not projected on (nor, in
#: GradVac, corrected towards): the coefficient ``<p, g_j> / ||g_j||^2`` would be 0/0 or rounding
#: noise. Relative, so that the weights do not depend on the gradients' overall scale.
TINY = 1e-20


def random_orders(k: int, generator: torch.Generator) -> Tensor:
    """A (k, k) CPU tensor whose row i is an independent, uniformly random permutation of
    ``0 .. k-1`` (the order in which task i visits the tasks), drawn at once from ``generator``."""
    keys = torch.rand(k, k, generator=generator, dtype=torch.float64)
    return keys.argsort(dim=1, stable=True)


def check_orders(gramian: Tensor, orders: Tensor) -> None:
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"The Gramian must be a square matrix; got shape {tuple(gramian.shape)}.")
    k = gramian.shape[0]
    if orders.shape != (k, k):
        raise ValueError(f"Expected a ({k}, {k}) tensor of visiting orders; got {tuple(orders.shape)}.")


def normalised(gramian: Tensor) -> Tensor:
    """The float64 Gramian divided by its largest diagonal entry (PCGrad's and GradVac's
    coefficients are invariant to that scale; the thresholds become relative)."""
    g = gramian.to(torch.float64)
    return g / g.diagonal().max().clamp_min(1e-300)


def pcgrad_coefficients(gramian: Tensor, orders: Tensor, *, skip_self: bool = True) -> Tensor:
    """The (k, k) float64 matrix ``C`` with ``p_i = sum_k C_ik g_k`` after PCGrad's projections.

    Task i starts from ``p_i = g_i`` and visits the tasks ``orders[i, 0], orders[i, 1], ...``;
    at task j it sets ``p_i <- p_i - <p_i, g_j> / ||g_j||^2 g_j`` when ``<p_i, g_j> < 0``
    (current ``p_i``, original ``g_j``), skipping ``j = i`` when ``skip_self`` and ``j`` with a
    zero or tiny gradient (:data:`TINY`). The weights of ``d = sum_i p_i`` are ``C.sum(0)``.

    Everything comes from the Gramian: with ``M = C G`` (row i holds ``<p_i, g_k>`` for every k),
    a projection adds ``a`` to ``C_ij`` and ``a G_j`` to ``M_i``. The k projected vectors advance
    together, one position of their permutations per step: k steps of O(k^2) tensor work each.
    """
    check_orders(gramian, orders)
    k = gramian.shape[0]
    g = normalised(gramian)
    eye = torch.eye(k, dtype=torch.float64, device=g.device)
    if k < 2 or not bool((g < 0).any()):  # no conflicting pair: nothing is ever projected
        return eye
    diag = g.diagonal()
    usable = diag > TINY
    neg_inv = torch.where(usable, -1.0 / torch.where(usable, diag, 1.0), 0.0)
    orders = orders.to(g.device)
    rows = torch.arange(k, device=g.device)
    factor = neg_inv[orders]  # factor[i, t] = -1 / ||g_j||^2 for j = orders[i, t]; 0: skip j
    if skip_self:
        factor = factor.masked_fill(orders == rows[:, None], 0.0)
    # step-major copies: row t holds, for every i, what task i needs at its t-th position
    factor_t = factor.T.contiguous()
    orders_t = orders.T.contiguous()
    flat_t = (orders + rows[:, None] * k).T.contiguous()  # positions of M[i, orders[i, t]] in M.view(-1)
    m = g.clone()
    m_flat = m.view(-1)
    coef = torch.empty(k, k, dtype=torch.float64, device=g.device)  # coef[t, i]: added at step t
    rows_of_g = torch.empty(k, k, dtype=torch.float64, device=g.device)
    for t in range(k):
        a = coef[t]
        torch.index_select(m_flat, 0, flat_t[t], out=a)  # <p_i, g_j>
        a.clamp_max_(0.0).mul_(factor_t[t])  # -min(0, <p_i, g_j>) / ||g_j||^2 >= 0
        if t + 1 < k:
            torch.index_select(g, 0, orders_t[t], out=rows_of_g)
            m.addcmul_(a.unsqueeze(1), rows_of_g)  # <p_i, g_.> += a_i <g_j, g_.>
    return eye.scatter_add_(1, orders, coef.T)


Reduction = Literal["sum", "mean"]


class RandomOrder(OwnedGenerator):
    """Mixin: random visiting orders from a method-owned generator (seeded from ``seed``; its
    state is part of the checkpoint, so a resumed run draws the same orders)."""

    _drawn: Tensor | None = None

    def _orders(self, k: int) -> Tensor:
        self._drawn = orders = random_orders(k, self._gen())
        return orders

    def step_extras(self) -> dict[str, Any]:
        """``StepInfo.extras["orders"]``: the step's visiting orders (row i: task i's order, as
        indices among the tasks that took part in the step), enough to replay it."""
        drawn, self._drawn = self._drawn, None
        return {} if drawn is None else {"orders": drawn}


@register("pcgrad")
class PCGrad(RandomOrder, GramianWeighting):
    """PCGrad: Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020.

    Every task gradient ``g_i`` is projected, in a random order of the tasks, off the normal plane
    of each task gradient it conflicts with: ``p_i <- p_i - <p_i, g_j> / ||g_j||^2 g_j`` when
    ``<p_i, g_j> < 0`` (the current ``p_i``, the original ``g_j``); ``d = sum_i p_i``. Each task
    draws its own permutation, as in the ports. Computed on the Gramian alone
    (:func:`pcgrad_coefficients`): ``p_i = sum_k C_ik g_k`` and ``w = C.sum(0)``, so
    ``w_j = 1 + (the projection coefficients on g_j)``; all ``p_i`` advance together, one position
    of their permutations at a time (k tensor steps, no Python loop over pairs).

    Defaults: ``reduction="sum"`` (the nash-mtl and LibMTL ports; the Pytorch-PCGrad port
    averages: ``"mean"`` divides by the number of tasks in the step); heads get their own gradient
    (both ports); ``skip_self=True``: j ranges over the other tasks, as in the paper's Algorithm 1
    and TorchJD, while the nash-mtl and LibMTL ports also visit ``j = i`` (``skip_self=False``),
    which matters only when earlier projections turned ``p_i`` against ``g_i``. The official
    TensorFlow code was not read.

    Departures from the ports: the order comes from the method's own generator (``seed``; its
    state is checkpointed) instead of Python's or torch's global RNG, and rows are permutations
    drawn together (argsort of uniform keys), so the orders differ from the ports' for the same
    seed; a zero or tiny ``g_j`` (``||g_j||^2 <= 1e-20 max_k ||g_k||^2``) is skipped, where
    LibMTL adds ``1e-8`` to ``||g_j||^2`` (an absolute constant, so its projections fall short
    for small gradients) and TorchJD divides by it unguarded (relying on ``<p_i, g_j>`` being
    exactly 0 for a zero ``g_j``). So the weights are invariant to the gradients' overall scale;
    they are computed in float64. ``level="representation"`` runs the same projections on the
    representation gradients (LibMTL refuses ``rep_grad`` for PCGrad).
    """

    head_grad: HeadGrad = hparam(
        "own", GramianWeighting._hparams["head_grad"].check, "heads get their own gradient (as the ports)"
    )
    reduction: Reduction = hparam(
        "sum", one_of("sum", "mean"), "sum of the projected gradients (ports) or their mean"
    )
    skip_self: bool = hparam(
        True, boolean(), "visit only j != i (paper, TorchJD); False: also j = i (nash-mtl, LibMTL ports)"
    )
    seed: int = hparam(0, number(ge=0, integer=True), "seed of the method's generator of visiting orders")

    def _build(self, tasks: TaskSet) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = len(gramian)
        if k == 1:
            return torch.ones(1, dtype=torch.float64, device=gramian.device)
        w = pcgrad_coefficients(gramian, self._orders(k), skip_self=self.skip_self).sum(0)
        return w / k if self.reduction == "mean" else w
