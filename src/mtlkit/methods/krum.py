"""Krum and Multi-Krum: the task gradient(s) closest to their neighbours (Blanchard et al., 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import boolean, hparam, number
from mtlkit.methods.registry import register


def krum_weights(gram: Tensor, n_byzantine: int, n_selected: int = 1, squared: bool = True) -> Tensor:
    """Multi-Krum weights from a K x K Gramian: ``1/m`` on the ``m`` rows with the lowest score.

    The score of row i is the sum of its (squared) distances to its ``K - f - 2`` nearest other
    rows, with ``||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij``. Ties go to the lower index. With no
    neighbour to count (``K - f - 2 <= 0``, which :class:`Krum` allows only for ``f = 0`` and at
    most two rows) every score is equal and the mean of the rows is returned. ``m`` is capped
    at ``K``.

    Returns float64 weights (K,) on ``gram``'s device.
    """
    g = gram.detach().to(torch.float64)
    k = g.shape[0]
    neighbours = k - n_byzantine - 2
    if neighbours <= 0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=g.device)
    diag = g.diagonal()
    dist = (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0)
    if not squared:
        dist = dist.sqrt()
    dist.fill_diagonal_(torch.inf)  # a row is not its own neighbour
    scores = dist.sort(dim=1).values[:, :neighbours].sum(dim=1)
    m = min(n_selected, k)
    chosen = torch.sort(scores, stable=True).indices[:m]
    w = torch.zeros(k, dtype=torch.float64, device=g.device)
    w[chosen] = 1.0 / m
    return w


@register("krum")
class Krum(GramianWeighting):
    """Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017 (as an aggregator of task
    gradients, as in TorchJD).

    With ``f = n_byzantine`` rows that may be adversarial, each task gradient ``g_i`` is scored by
    the sum of its squared distances to its ``K - f - 2`` nearest other gradients, and the
    gradient with the lowest score is the update (Krum); with ``n_selected = m > 1`` the mean of
    the ``m`` best is (Multi-Krum, the paper's section 5). The distances come from the Gramian
    (``||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij``), so Krum runs at both levels and costs no more
    than any Gramian method. Blanchard et al.'s guarantee needs ``K >= 2f + 3``: a larger ``f``
    is refused at setup (``ConfigError``), and a step in which fewer than ``2f + 3`` tasks have a
    labelled sample raises ``ConfigError`` before anything is updated (the guarantee would not
    hold for that batch). The overall scale is the mean of the selected gradients (weights
    summing to 1); heads get their own gradient (TorchJD's multi-task backward: with the
    weighted heads the unselected tasks' heads would not learn).

    Defaults: ``n_byzantine=0`` (TorchJD has no default: it must be given; 0 lets Krum run on any
    task set, choosing the most central gradient; set it to the number of tasks you want to
    tolerate), ``n_selected=1`` (TorchJD and the paper's Krum).

    Departures from TorchJD's ``Krum`` / ``KrumWeighting``: TorchJD sums plain (not squared)
    distances, unlike the paper (``squared=False`` reproduces it); it requires only
    ``K >= f + 3`` rows (the score needs one neighbour) and raises below that, also for ``f = 0``,
    where this class returns the mean for one or two rows; it drops each row's smallest distance
    as its own (here the diagonal is excluded by position, the same with duplicated rows); and
    the square root of a distance that round-off made negative is clamped here, not NaN.
    """

    head_grad: HeadGrad = hparam(
        "own", GramianWeighting._hparams["head_grad"].check, "heads get their own gradient (TorchJD)"
    )
    n_byzantine: int = hparam(
        0, number(ge=0, integer=True), "f: the number of task gradients that may be adversarial"
    )
    n_selected: int = hparam(
        1, number(ge=1, integer=True), "m: the mean of the m best-scored gradients (1: Krum)"
    )
    squared: bool = hparam(
        True, boolean(), "score with squared distances (paper); False: plain distances (TorchJD)"
    )

    def _build(self, tasks: TaskSet) -> None:
        k, f = len(tasks), self.n_byzantine
        if f > 0 and k < 2 * f + 3:
            raise ConfigError(
                f"Krum: n_byzantine={f} needs at least 2 * {f} + 3 = {2 * f + 3} tasks (Blanchard et "
                f"al.'s condition K > 2f + 2); there are {k}. Lower n_byzantine to at most {max((k - 3) // 2, 0)}."
            )
        if self.n_selected > k:
            raise ConfigError(f"Krum: n_selected={self.n_selected} exceeds the number of tasks ({k}).")

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        a, f = len(gramian), self.n_byzantine
        if f > 0 and a < 2 * f + 3:
            raise ConfigError(
                f"Krum: n_byzantine={f} needs at least {2 * f + 3} tasks with a labelled sample in "
                f"the batch; this batch has {a}. Nothing was updated. Lower n_byzantine, or label "
                "every task in every batch."
            )
        return krum_weights(gramian, f, self.n_selected, self.squared)
