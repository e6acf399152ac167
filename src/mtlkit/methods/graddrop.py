"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError, EngineError
from mtlkit.methods.gradient_methods import JacobianAggregator, Level
from mtlkit.methods.hparams import boolean, hparam, none, number, numbers, one_of
from mtlkit.methods.owned_generator import OwnedGenerator
from mtlkit.methods.registry import register


def graddrop_mask(stat: Tensor, uniform: Tensor, eps: float = 0.0) -> Tensor:
    """The (A, c) keep-mask of GradDrop from the per-task statistics ``stat`` (A, c) and one
    uniform draw in [0, 1) per coordinate (c,).

    Purity ``P = (1 + sum_k s_k / (sum_k |s_k| + eps)) / 2`` (``1/2`` where every ``s_k`` is 0);
    at each coordinate the positive entries are kept when ``U < P``, the negative ones otherwise,
    so exactly one sign survives, with probabilities ``P`` and ``1 - P``.
    """
    total = stat.sum(dim=0, dtype=torch.float64)
    mass = stat.abs().sum(dim=0, dtype=torch.float64)
    safe = torch.where(mass > 0, mass + eps, torch.ones_like(mass))
    purity = torch.where(mass > 0, 0.5 * (1.0 + total / safe), torch.full_like(mass, 0.5))
    keep_positive = uniform.to(purity) < purity
    return ((stat > 0) & keep_positive) | ((stat < 0) & ~keep_positive)


@register("graddrop")
class GradDrop(OwnedGenerator, JacobianAggregator):
    """GradDrop: Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign:
    Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020.

    At every coordinate, keep only the task-gradient entries of one sign, chosen at random with
    the "positive sign purity" ``P = (1 + sum_k s_k / sum_k |s_k|) / 2``: positive entries
    survive with probability ``P``, negative ones with ``1 - P`` (one uniform draw per
    coordinate, shared by the tasks). The update is ``sum_k (l_k + (1 - l_k) M_k) * g_k`` with
    leak ``l`` (the sum convention of every source: LibMTL, the fairgrad/Nash-MTL baseline,
    TorchJD). Where all tasks agree in sign it is the plain sum; with ``leak=1`` it is the sum;
    with one task it is that task's gradient.

    Levels (three definitions exist; see the spec):

    - ``level="representation"`` (default; the paper and LibMTL): the rows are the gradients
      w.r.t. the shared representation ``A`` (the model's ``representation``, batch first).
      The statistic is ``s_k = sum_batch sign(A) * dL_k/dA`` (``sign_input=False`` drops the
      ``sign(A)`` factor), one purity and one draw per feature, the mask is broadcast over the
      batch, and the masked sum is back-propagated through the trunk. Needs
      ``output=model(x, full_output=True)`` and one representation tensor.
    - ``level="parameter"`` (the GradDrop baseline of the fairgrad/Nash-MTL code, TorchJD): the
      rows are the gradients of the shared parameters, ``s_k = g_k`` (``sign_input`` does not
      apply), one draw per parameter. That baseline also clips the update to ``max_norm=1.0``.

    Departures: the purity has no epsilon by default (LibMTL adds 1e-7, the fairgrad baseline
    1e-8; ``eps`` reproduces them): an epsilon makes the mask depend on the gradient scale (at
    entries of size ~eps, agreeing tasks get dropped), so instead a coordinate where every
    statistic is 0 gets ``P = 1/2`` (its entries are dropped either way). A tie ``U = P`` keeps
    the negative entries (the paper and the ports drop both signs then); with ``U`` in [0, 1)
    this makes the keep probabilities exactly ``P`` and ``1 - P`` and one task exact. TorchJD's
    monotone ``f(P)`` is not offered (identity, its default). ``U`` comes from the method's own
    CPU generator (seeded by ``seed``, saved in the state), so masks are the same on every
    device and a resumed run draws the same masks. Heads get their own gradient (every source).
    Under DDP the representation-level statistic is summed over the ranks and every rank draws the
    same masks, so a data-parallel step equals the one-process step on the global batch.
    """

    level: Level = hparam(
        "representation",
        one_of("parameter", "representation"),
        "representation (paper, LibMTL: activation gradients, sign(A), batch-summed purity) or "
        "parameter (fairgrad/Nash-MTL baseline, TorchJD)",
    )
    leak: float | Sequence[float] = hparam(
        0.0,
        number(ge=0, le=1) | numbers(number(ge=0, le=1)),
        "leak l in [0, 1] (or one per task): each gradient passes with l + (1 - l) * mask (official 0)",
    )
    sign_input: bool = hparam(
        True, boolean(), "representation level: multiply by sign(A) before the batch sum (paper)"
    )
    eps: float = hparam(0.0, number(ge=0), "added to the purity's denominator (LibMTL 1e-7, fairgrad 1e-8)")
    max_norm: float | None = hparam(
        None, number(gt=0) | none(), "clip the shared update's norm (fairgrad baseline: 1.0)"
    )
    seed: int = hparam(0, number(ge=0, integer=True), "seed of the method's generator for the draws")
    shards_samples = True

    def _build(self, tasks: TaskSet) -> None:
        if not isinstance(self.leak, (int, float)) and len(self.leak) != len(tasks):
            raise ConfigError(f"GradDrop got {len(self.leak)} leak values for {len(tasks)} tasks.")

    def _leak(self, a: int, like: Tensor) -> Tensor:
        if isinstance(self.leak, (int, float)):
            return torch.full((a,), float(self.leak), dtype=like.dtype, device=like.device)
        values = torch.tensor([float(v) for v in self.leak], dtype=like.dtype)
        index = self.active_index if self.active_index is not None else torch.arange(a)
        return values[index.cpu()].to(like.device)

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        a = jacobian.shape[0]
        if self.level == "representation":
            z = self.features
            if z is None or z.numel() != jacobian.shape[1]:
                raise EngineError(
                    "GradDrop(level='representation') needs the representation of the current step; "
                    "call it through backward(losses, model, output)."
                )
            batch = z.shape[0] if z.dim() > 0 else 1
            rows = jacobian.reshape(a, batch, -1)
            signed = (
                rows * torch.sign(z.detach()).reshape(1, batch, -1).to(rows.dtype)
                if self.sign_input
                else rows
            )
            stat = signed.sum(dim=1)  # (A, features): one statistic per feature, shared by the batch
            if self.parallel is not None:  # the global batch's sum; the draws agree across ranks
                stat = self.parallel.sum_(stat.contiguous())
        else:
            rows = jacobian.reshape(a, 1, -1)
            stat = jacobian
        uniform = torch.rand(stat.shape[1:], generator=self._gen(), dtype=torch.float64)
        mask = graddrop_mask(stat, uniform.to(stat.device), self.eps)
        leak = self._leak(a, rows)[:, None]
        factor = leak + (1 - leak) * mask.to(rows.dtype)  # (A, features)
        return torch.einsum("abf,af->bf", rows, factor).reshape(-1)
