"""DB-MTL: dual balancing of loss scales (logarithms) and gradient magnitudes (Lin et al.)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.base import StepInfo, StepInputs
from mtlkit.methods.gradient_methods import JacobianAggregator, all_finite
from mtlkit.methods.hparams import hparam, number
from mtlkit.methods.registry import register

_EPS = 1e-8  # in log(L + eps) and in the norm ratio, as in LibMTL (the authors' code)


@register("db_mtl")
class DBMTL(JacobianAggregator):
    """DB-MTL: Lin, Ye, Xu, Shi, Zhang, Kwok, "Dual-Balancing for Multi-Task Learning", arXiv
    2308.12029, 2023 (LibMTL's ``DB_MTL`` is the authors' code; no separate official repository).

    Loss-scale balancing: every task is trained on ``log(L_k + 1e-8)``, whose gradient is
    ``h_k = g_k / (L_k + 1e-8)`` (a constant factor on a loss changes nothing). The shared update
    uses an exponential moving average of these gradients, ``H_k <- beta_t H_k + (1 - beta_t) h_k``
    with ``beta_t = beta / t^beta_sigma`` (t = 1, 2, ... counts the steps; H starts at 0, no bias
    correction), and gradient-magnitude balancing: ``d = sum_k a_k H_k`` with
    ``a_k = max_j ||H_j|| / (||H_k|| + 1e-8)``, so every task contributes a vector of the
    largest norm. Heads get their own task's log-loss gradient ``dL_k/dphi_k / (L_k + 1e-8)``, as
    in the authors' code (each log-loss is back-propagated whole). Defaults are LibMTL's
    (``DB_beta`` 0.9, ``DB_beta_sigma`` 0).

    State: ``ema`` (K x d, d = number of shared parameters) is created at the first step, when d
    is known (until then it is K x 0; a saved state of any width loads, and moves with ``.to()``),
    in the wider of the method's buffer dtype and the gradients' dtype; the step counter is in the
    extra state. A loss must be ``>= 0`` (the logarithm): a negative one raises
    :class:`~mtlkit.errors.NonPositiveLossError` before anything is updated.

    Departures from LibMTL: a task without a labelled sample takes no part in the step (its EMA
    row is left as it is and the norm balancing is over the tasks in the step); the shared
    gradients are taken in one engine pass rather than K backwards. With ``beta = 0`` the method
    needs only the Gramian, but it is not special-cased here.
    """

    lazy_buffers = ("ema",)

    head_grad: HeadGrad = hparam(
        "own",
        JacobianAggregator._hparams["head_grad"].check,
        "heads get their own task's gradient of log(L_k + 1e-8) (the authors' code)",
    )
    beta: float = hparam(0.9, number(ge=0), "EMA coefficient of the log-loss gradients (LibMTL DB_beta 0.9)")
    beta_sigma: float = hparam(
        0.0, number(ge=0), "decay exponent: beta_t = beta / t^beta_sigma (LibMTL DB_beta_sigma 0)"
    )
    ema: Tensor

    def _validate(self) -> None:
        if self.beta >= 1:
            raise ConfigError(
                f"DBMTL: beta must be < 1 (the EMA would never see a gradient); got {self.beta!r}."
            )

    def _build(self, tasks: TaskSet) -> None:
        self.register_buffer("ema", torch.zeros(len(tasks), 0))

    def _step(self, inputs: StepInputs) -> StepInfo:
        # log(L + 1e-8) is defined for L >= 0; checked before any gradient or state is written
        self._require_positive(inputs.names, inputs.losses, inputs.active, allow_zero=True)
        return super()._step(inputs)

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        d = jacobian.shape[1]
        if not all_finite(jacobian):  # fp16 overflow under a GradScaler: skip, state kept
            return jacobian.new_full((d,), float("nan"))
        assert self.active_index is not None
        ema = self.state_rows("ema", jacobian)
        if len(jacobian) == 0:
            return jacobian.new_zeros(d)
        self.updates += 1
        beta_t = self.beta / self.updates**self.beta_sigma
        inv = (1.0 / (losses + _EPS)).to(ema.dtype)
        logs = jacobian.to(ema.dtype) * inv[:, None]  # h_k, the gradients of log(L_k + eps)
        idx = self.active_index.to(ema.device)
        if len(idx) == len(ema):  # every task: in place, no K x d copy
            rows = ema.lerp_(logs, 1.0 - beta_t)
        else:
            rows = torch.lerp(ema.index_select(0, idx), logs, 1.0 - beta_t)
            ema.index_copy_(0, idx, rows)
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
        scale = norms.max() / (norms + _EPS)
        return torch.tensordot(scale.to(rows.dtype), rows, dims=1)

    def head_weights(self, losses: Tensor, active: Tensor) -> Tensor | None:
        return 1.0 / (losses + _EPS)
