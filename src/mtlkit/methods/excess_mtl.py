"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.methods.base import StepInfo, StepInputs
from mtlkit.methods.gradient_methods import JacobianAggregator, all_finite
from mtlkit.methods.hparams import hparam, number, one_of
from mtlkit.methods.registry import register

_ADAGRAD_EPS = 1e-7  # inside sqrt(A + eps), as in the official code, LibMTL and TorchJD
_BASELINE_EPS = 1e-7  # relative to the largest baseline: E / (E0 + eps * max E0)


@register("excess_mtl")
class ExcessMTL(JacobianAggregator):
    """ExcessMTL: He, Zhou, Zhao et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024
    (official code yifei-he/ExcessMTL, a LibMTL fork; LibMTL's ``ExcessMTL`` is a port of it).

    Each step, with the shared gradients ``g_k``: AdaGrad-style accumulators ``A_k += g_k^2``
    (elementwise), the excess-risk proxy ``E_k = sum_i g_{k,i}^2 / sqrt(A_{k,i} + 1e-7)``
    (``g_k^T H_k^{-1} g_k`` with a diagonal curvature estimate), relative to a baseline ``E0_k``;
    then an exponentiated-gradient step on the task weights, ``w_k <- w_k exp(eta E_k / E0_k)``,
    renormalised to sum to ``scale``, and the shared direction ``d = J^T w`` with the new
    weights. During a task's first ``warmup_steps`` steps its ``E_k`` is averaged into ``E0_k``
    and the weights are not updated (1: the baseline is the first step's excess and that step
    uses the initial weights ``scale / K``, as in the official code and LibMTL; TorchJD's
    ``n_warmup_steps``; the paper's appendix suggests a few epochs).

    Defaults are the official code's / LibMTL's: ``robust_step_size`` 1e-2, weights summing to
    K (``scale="num_tasks"``), heads get the weighted gradient (the official ``sum_k w_k L_k``
    backward; ``head_grad="own"`` gives them their own). TorchJD uses ``robust_step_size`` 1.0 and
    weights summing to 1 (``scale=1``); the normalisation changes only the update's size, never
    the weights' ratios.

    Departures (documented choices where the sources are silent or unsafe): the baseline is
    divided as ``E_k / (E0_k + 1e-7 max_j E0_j)`` (relative, so no gradient scale matters; the
    official code divides by ``E0_k`` alone and gives inf/NaN for a task whose first gradient is
    zero, TorchJD adds an absolute 1e-7), and a task whose warm-up excess is exactly 0 keeps
    warming up until it is not. The exponentiated step is taken in log space (a huge ratio gives
    that task all the weight instead of inf/NaN). A task without a labelled sample takes no part
    in the step: its accumulators, warm-up and weight are left as they are, and the tasks in the
    step share the weight they held before it (so the total stays ``scale``).

    State: ``grad_sq_sum`` (K x d, d = number of shared parameters) is created at the first step,
    when d is known (until then it is K x 0; a saved state of any width loads, and moves with
    ``.to()``), in the wider of the method's buffer dtype and the gradients' dtype; ``task_weights``,
    ``baseline``, ``warmup_sum`` and ``warmup_count`` are K-vectors.
    """

    lazy_buffers = ("grad_sq_sum",)

    head_grad: HeadGrad = hparam(
        "weighted",
        one_of("own", "weighted"),
        "heads get the weighted gradient w_k dL_k/dphi_k (official code and LibMTL) or their own",
    )
    robust_step_size: float = hparam(
        1e-2, number(gt=0), "step eta of the exponentiated weight update (official/LibMTL 1e-2; TorchJD 1.0)"
    )
    warmup_steps: int = hparam(
        1,
        number(ge=1, integer=True),
        "steps per task whose excess is averaged into the baseline before the weights move (official 1)",
    )
    scale: float | Literal["num_tasks"] = hparam(
        "num_tasks",
        number(gt=0) | one_of("num_tasks"),
        "sum of the weights: 'num_tasks' = K (official code and LibMTL) or a number (TorchJD: 1)",
    )
    grad_sq_sum: Tensor
    task_weights: Tensor
    baseline: Tensor
    warmup_sum: Tensor
    warmup_count: Tensor

    def _build(self, tasks: TaskSet) -> None:
        k = len(tasks)
        total = float(k) if self.scale == "num_tasks" else float(self.scale)
        self.register_buffer("grad_sq_sum", torch.zeros(k, 0))
        self.register_buffer("task_weights", torch.full((k,), total / k, dtype=torch.float64))
        self.register_buffer("baseline", torch.zeros(k, dtype=torch.float64))  # 0: not set yet
        self.register_buffer("warmup_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("warmup_count", torch.zeros(k, dtype=torch.int64))

    def _excess(self, jacobian: Tensor) -> Tensor:
        """Accumulate ``g^2`` for the active tasks and return their excess proxies ``E`` (float64)."""
        assert self.active_index is not None
        acc = self.state_rows("grad_sq_sum", jacobian)
        rows = jacobian.to(acc.dtype)
        square = rows * rows
        idx = self.active_index.to(acc.device)
        if len(idx) == len(acc):
            acc.add_(square)
            sums = acc
        else:
            sums = acc.index_select(0, idx).add_(square)
            acc.index_copy_(0, idx, sums)
        return (square / (sums + _ADAGRAD_EPS).sqrt()).sum(dim=1, dtype=torch.float64)

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        d = jacobian.shape[1]
        if not all_finite(jacobian):  # fp16 overflow under a GradScaler: skip, state kept
            return jacobian.new_full((d,), float("nan"))
        assert self.active_index is not None
        excess = self._excess(jacobian)
        if len(jacobian) == 0:
            return jacobian.new_zeros(d)
        idx = self.active_index.to(self.task_weights.device)
        excess = excess.to(self.task_weights.device)
        baseline = self.baseline[idx]
        ready = baseline > 0  # tasks past their warm-up: their weights move
        if bool(ready.any()):
            floor = _BASELINE_EPS * self.baseline.max()
            ratio = excess[ready] / (baseline[ready] + floor)
            moving = idx[ready]
            old = self.task_weights[moving].to(torch.float64)
            logits = old.clamp_min(torch.finfo(torch.float64).tiny).log() + self.robust_step_size * ratio
            new = old.sum() * torch.softmax(logits, dim=0)  # the same total as before the step
            self.task_weights.index_copy_(0, moving, new.to(self.task_weights.dtype))
        warming = idx[~ready]
        if len(warming):  # the step that completes a warm-up sets the baseline, the weights stay
            count = self.warmup_count[warming] + 1
            total = self.warmup_sum[warming] + excess[~ready].to(self.warmup_sum.dtype)
            self.warmup_count.index_copy_(0, warming, count)
            self.warmup_sum.index_copy_(0, warming, total)
            mean = total / count.to(total.dtype)
            done = (count >= self.warmup_steps) & (total > 0)
            self.baseline.index_copy_(0, warming, torch.where(done, mean, 0.0).to(self.baseline.dtype))
        w = self.task_weights[idx].to(device=jacobian.device, dtype=jacobian.dtype)
        return torch.tensordot(w, jacobian, dims=1)

    def head_weights(self, losses: Tensor, active: Tensor) -> Tensor | None:
        return self.task_weights.to(losses.device) if self.head_grad == "weighted" else None

    def _step(self, inputs: StepInputs) -> StepInfo:
        info = super()._step(inputs)
        # d = J^T w exactly: report the weights (0 for the tasks left out of the step)
        active = inputs.active.to(self.task_weights.device)
        info.weights = torch.where(active, self.task_weights, 0.0).detach().clone()
        return info
