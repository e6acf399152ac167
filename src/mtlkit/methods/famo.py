"""FAMO: fast adaptive multitask optimisation (Liu, Feng, Stone, Liu, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam

from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError, EngineError
from mtlkit.methods.base import StepInputs
from mtlkit.methods.hparams import hparam, none, number, numbers
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register

_EPS = 1e-8  # added to L_k - m_k before every logarithm, as in the official code


@register("famo")
class FAMO(LossWeighting):
    """FAMO: Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

    State: logits ``xi`` (K, init 0) with their own Adam. Each step, with ``z = softmax(xi)``,
    ``D_k = L_k - m_k + 1e-8`` and ``c = sum_k z_k / D_k``, the model minimises
    ``sum_k (z_k / c) log D_k``, i.e. one backward with effective weights ``w_k = z_k / (c D_k)``
    (they sum to 1). The shared gradient is then clipped to ``max_norm``. After the optimiser step
    the caller passes the losses recomputed on the same batch, without gradients, to
    :meth:`after_step` (the Trainer and :class:`~mtlkit.methods.Driver` do; a skipped call raises on
    the next step). There ``delta_k = log D_k(before) - log D_k(after)`` is the log-loss decrease
    each task got, and ``xi`` takes one Adam step along ``J_softmax(xi)^T delta`` (as a gradient,
    so Adam *descends* it): tasks that improved the most lose weight. No per-task gradient is ever
    formed. The Adam moments are buffers of the method, updated by torch's own functional Adam,
    so they move with ``.to()`` and are part of ``state_dict()``.

    Losses must exceed ``m_k``: a labelled task with ``L_k - m_k + 1e-8 <= 0`` raises
    :class:`~mtlkit.errors.NonPositiveLossError` before anything is updated. Tasks without a
    labelled sample get weight 0 and ``delta_k = 0`` (the step says nothing about them); their
    logit still moves through the softmax coupling (``-z_k <z, delta>``) and Adam's momentum and
    weight decay, as every logit does in the official update.
    """

    logits: Tensor
    min_loss: Tensor
    adam_exp_avg: Tensor
    adam_exp_avg_sq: Tensor
    adam_step: Tensor
    lr: float = hparam(0.025, number(gt=0), "Adam learning rate of xi (official --method-params-lr 0.025)")
    gamma: float = hparam(
        1e-3,
        number(ge=0),
        "Adam weight decay on xi (official run scripts: 1e-3 for NYUv2, QM9 and CelebA, 1e-2 for "
        "Cityscapes; LibMTL 1e-3)",
    )
    max_norm: float | None = hparam(
        1.0, number(ge=0) | none(), "clip the shared gradient's norm to this after the backward (0/None: off)"
    )
    min_losses: Sequence[float] | None = hparam(
        None, numbers(number()) | none(), "the m_k (official default 0): known lower bounds of the losses"
    )

    def _build(self, tasks: TaskSet) -> None:
        k = len(tasks)
        if self.min_losses is not None and len(self.min_losses) != k:
            raise ConfigError(f"FAMO got {len(self.min_losses)} min_losses for {k} tasks.")
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer(
            "min_loss", torch.tensor(list(self.min_losses or [0.0] * k), dtype=torch.float32)
        )
        self.register_buffer("adam_exp_avg", torch.zeros(k))
        self.register_buffer("adam_exp_avg_sq", torch.zeros(k))
        self.register_buffer("adam_step", torch.zeros(()))
        self._before: Tensor | None = None  # log D_k of the last backward
        self._before_active: Tensor | None = None

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        gap = losses - self.min_loss.to(losses) + _EPS
        # checked here, after the finiteness checks and before any state or gradient is written
        self._require_positive(self.task_names or [], gap, active)
        gap = torch.where(active, gap, 1.0)  # unlabelled tasks: log 1 = 0, weight 0 below
        inv = torch.softmax(self.logits, dim=0).to(gap.dtype) / gap * active
        self._before = gap.log()
        self._before_active = active
        return (inv / inv.sum().clamp_min(1e-30)).to(losses.dtype)  # = z_k / (c D_k); sums to 1

    def after_backward(self, inputs: StepInputs) -> None:
        if not self.max_norm:
            return
        if not inputs.knows_shared:
            raise EngineError(
                "FAMO clips the shared gradient (max_norm): pass the model (or shared=) to backward(), "
                "or set max_norm=None."
            )
        params = [p for p in inputs.shared if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params if p.grad is not None]
        # torch.nn.utils.clip_grad_norm_ in two parts: on the CPU the multiply by min(1, max/norm)
        # is skipped when it would be by 1 (bit-identical, and it is half the clip's time); on a
        # GPU it always runs, to avoid a host sync. With a GradScaler the gradients are scaled:
        # clip at the scaled norm.
        max_norm = self.max_norm * inputs.scale
        total = torch.nn.utils.get_total_norm(grads)
        if grads[0].device.type != "cpu" or not float(total) <= max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)

    def _after_step(self, losses: Tensor, active: Tensor) -> None:
        """Update the logits from the losses on the same batch after the optimiser step."""
        assert self._before is not None and self._before_active is not None
        after = losses.to(self._before.device, self._before.dtype)
        active = self._before_active & active.to(self._before_active.device)
        # a loss that fell below m_k after the step: clamp (the official code would give NaN)
        gap = (after - self.min_loss.to(after) + _EPS).clamp_min(_EPS)
        delta = ((self._before - gap.log()) * active).to(self.logits.dtype)
        # J_softmax(xi)^T delta in closed form: z * (delta - <z, delta>) (the official code asks
        # autograd for this vector-Jacobian product; same value, a fraction of the time)
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum())
        adam(
            [self.logits],
            [grad],
            [self.adam_exp_avg],
            [self.adam_exp_avg_sq],
            [],
            [self.adam_step],
            foreach=False,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=self.lr,
            weight_decay=self.gamma,
            eps=1e-8,
            maximize=False,
        )
        self._before = self._before_active = None
