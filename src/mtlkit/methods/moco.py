"""MoCo: stochastic multi-objective gradient with tracked task gradients (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad, accumulate_gramian
from mtlkit.core.tasks import TaskSet
from mtlkit.methods.base import StepInfo, StepInputs
from mtlkit.methods.gradient_methods import JacobianAggregator, all_finite
from mtlkit.methods.hparams import boolean, hparam, number, one_of
from mtlkit.methods.min_norm import project_simplex
from mtlkit.methods.registry import register

LambdaUpdate = Literal["project", "softmax"]
_EPS = 1e-8  # in L_k g_k / (||g_k|| + eps), as in the official code and LibMTL


@register("moco")
class MoCo(JacobianAggregator):
    """MoCo: Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023.

    MGDA with stochastic gradients is biased; MoCo tracks every task's gradient and takes one
    projected-gradient step per iteration on the min-norm weights of the tracked gradients. At
    step ``t`` (0, 1, ...), with ``beta_t = beta / (1 + t)^beta_sigma`` and
    ``gamma_t = gamma / (1 + t)^gamma_sigma``:

    1. tracking ``Y_k <- Y_k - beta_t (Y_k - g_k)`` (Y starts at 0, no bias correction);
    2. ``lambda <- P(lambda - gamma_t (Y Y^T + rho I) lambda)`` with the new Y, where ``P`` is
       the Euclidean projection onto the simplex (``lambda_update="project"``) or a softmax
       (``"softmax"``); lambda starts at ``1/K``;
    3. ``d = scale * Y^T lambda`` with the new lambda.

    Defaults are the official NYUv2 code's (heshandevaka/MoCo, ``tracking`` in
    ``CAGrad/nyuv2/utils.py`` with its argparse defaults): beta 0.1, gamma (``delta``) 0.1,
    sigmas 0.5, simplex projection, no rho, the direction multiplied by K "to match the sum
    loss", heads get their own gradient. Its NYUv2 run script uses beta 0.99, sigmas 0 and the
    ``raw_loss`` mode (``raw_loss=True``: each gradient is replaced by ``L_k g_k / (||g_k|| +
    1e-8)`` before tracking, which needs losses >= 0). The official Cityscapes code uses the
    softmax and passes the epoch index as ``t``; here t counts steps, as in LibMTL and the paper.
    LibMTL's ``MoCo``: ``raw_loss=True, lambda_update="softmax", scale=1.0`` with its own
    defaults (beta 0.5, the others as here, ``rho`` 0). The lambda step has no factor 2 (the
    official NYUv2 code and LibMTL; the official Office/LibMTL fork has one).

    A task without a labelled sample takes no part in the step: its Y row and lambda are left as
    they are, the step solves the problem of the tasks in it (their lambdas renormalised to sum
    1, written back with the total they held before), and ``scale="num_tasks"`` multiplies by the
    number of tasks in the step. ``StepInfo.extras["lambda"]`` holds lambda (the weights of the
    tracked gradients, not of this step's J, so ``StepInfo.weights`` is ``None``).

    State: ``tracking`` (K x d, d = number of shared parameters) is created at the first step,
    when d is known (until then it is K x 0; a saved state of any width loads, and moves with
    ``.to()``), in the wider of the method's buffer dtype and the gradients' dtype; ``lambdas``
    (K, float64) and the step counter (extra state), which the schedules decay with.
    """

    lazy_buffers = ("tracking",)

    head_grad: HeadGrad = hparam(
        "own", JacobianAggregator._hparams["head_grad"].check, "heads get their own gradient (official code)"
    )
    beta: float = hparam(
        0.1, number(gt=0, le=1), "tracking rate of Y (official argparse 0.1; NYUv2 script 0.99; LibMTL 0.5)"
    )
    beta_sigma: float = hparam(
        0.5, number(ge=0), "decay exponent of beta_t = beta / (1 + t)^beta_sigma (official 0.5; script 0)"
    )
    gamma: float = hparam(0.1, number(ge=0), "step size of the lambda update (official 'delta' 0.1)")
    gamma_sigma: float = hparam(
        0.5, number(ge=0), "decay exponent of gamma_t = gamma / (1 + t)^gamma_sigma (official 0.5; script 0)"
    )
    rho: float = hparam(
        0.0, number(ge=0), "ridge in the lambda step: (Y Y^T + rho I) lambda (LibMTL MoCo_rho 0)"
    )
    lambda_update: LambdaUpdate = hparam(
        "project",
        one_of("project", "softmax"),
        "project onto the simplex (official NYUv2 code, the paper) or take a softmax (official "
        "Cityscapes code, LibMTL; lambda never becomes sparse)",
    )
    raw_loss: bool = hparam(
        False, boolean(), "track L_k g_k / (||g_k|| + 1e-8) instead of g_k (official 'raw_loss' mode; LibMTL)"
    )
    scale: float | Literal["num_tasks"] = hparam(
        "num_tasks",
        number(gt=0) | one_of("num_tasks"),
        "factor on Y^T lambda: 'num_tasks' = K (official, 'to match the sum loss') or a number (LibMTL 1)",
    )
    tracking: Tensor
    lambdas: Tensor

    def _build(self, tasks: TaskSet) -> None:
        k = len(tasks)
        self.register_buffer("tracking", torch.zeros(k, 0))
        self.register_buffer("lambdas", torch.full((k,), 1.0 / k, dtype=torch.float64))

    def _step(self, inputs: StepInputs) -> StepInfo:
        if self.raw_loss:  # L_k scales the tracked gradient: a negative loss would flip it
            self._require_positive(inputs.names, inputs.losses, inputs.active, allow_zero=True)
        info = super()._step(inputs)
        info.extras["lambda"] = self.lambdas.detach().clone()
        return info

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        d = jacobian.shape[1]
        if not all_finite(jacobian):  # fp16 overflow under a GradScaler: skip, state kept
            return jacobian.new_full((d,), float("nan"))
        assert self.active_index is not None
        y = self.state_rows("tracking", jacobian)
        a = len(jacobian)
        if a == 0:
            return jacobian.new_zeros(d)
        t = self.updates
        self.updates += 1
        beta_t = self.beta / (1 + t) ** self.beta_sigma
        gamma_t = self.gamma / (1 + t) ** self.gamma_sigma
        rows = jacobian.to(y.dtype)
        if self.raw_loss:
            norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
            rows = rows * (losses.to(norms.device) / (norms + _EPS)).to(rows.dtype)[:, None]
        idx = self.active_index.to(y.device)
        if a == len(y):  # every task: in place, no K x d copy
            tracked = y.lerp_(rows, beta_t)
        else:
            tracked = torch.lerp(y.index_select(0, idx), rows, beta_t)
            y.index_copy_(0, idx, tracked)
        gram = accumulate_gramian([tracked], a, precision="float64").to(self.lambdas.device)
        widx = idx.to(self.lambdas.device)
        held = self.lambdas[widx].to(torch.float64)
        mass = held.sum()
        lam = held / mass if bool(mass > 0) else torch.full_like(held, 1.0 / a)
        step = gram @ lam + self.rho * lam
        v = lam - gamma_t * step
        new = project_simplex(v) if self.lambda_update == "project" else torch.softmax(v, dim=0)
        self.lambdas.index_copy_(0, widx, (mass * new).to(self.lambdas.dtype))
        factor = float(a) if self.scale == "num_tasks" else float(self.scale)
        return torch.tensordot((factor * new).to(device=tracked.device, dtype=tracked.dtype), tracked, dims=1)
