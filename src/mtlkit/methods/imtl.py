"""IMTL: IMTL-L's learnable loss scales followed by IMTL-G on the scaled losses (LibMTL's IMTL)."""

from __future__ import annotations

import copy

import torch

from mtlkit.core.engine import HeadGrad
from mtlkit.methods.base import StepInfo, StepInputs
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import hparam
from mtlkit.methods.imtl_g import IMTLG
from mtlkit.methods.imtl_l import LearnableLossScales
from mtlkit.methods.registry import register


@register("imtl")
class IMTL(LearnableLossScales, IMTLG):
    """IMTL, the full method of Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021, as LibMTL implements it (its only IMTL class).

    Each loss is replaced by ``exp(s_k) L_k - s_k`` with a learnable ``s_k`` (IMTL-L, init 0,
    created by :meth:`setup`), and IMTL-G (:class:`~mtlkit.methods.imtl_g.IMTLG`) combines the
    gradients of the scaled losses, ``exp(s_k) g_k``: their Gramian is ``D G D`` with
    ``D = diag(exp(s))``, and with IMTL-G's weights ``w'`` on it the shared update is
    ``J^T (w' * exp(s))``. ``StepInfo.weights`` reports these effective weights of the raw losses
    (``w' * exp(s)``), and ``gramian``/``grad_norms`` those of the raw losses; ``extras`` holds the
    scales ``exp(s)`` and IMTL-G's ``degenerate`` flag. ``s_k`` gets the gradient of its scaled
    loss, ``exp(s_k) L_k - 1`` (0 for a task without labels), as in LibMTL's per-task backward.

    Heads get the gradient of their own scaled loss, ``exp(s_k) dL_k/dphi_k``, as in LibMTL
    (``head_grad="own"``); ``"weighted"`` gives them ``w'_k exp(s_k) dL_k/dphi_k`` (nash-mtl's
    convention for IMTL-G). No official code was released. Departures from LibMTL: IMTL-G's
    Gramian-only form and its guards (see :class:`~mtlkit.methods.imtl_g.IMTLG`; LibMTL inverts
    the form-A matrix with no fallback); with ``level="representation"`` the Gramian is the
    elementwise one over the batch (LibMTL sums the representation gradients over the batch
    first); ``s`` may have its own learning rate (``lr``; LibMTL: the optimiser's).
    """

    head_grad: HeadGrad = hparam(
        "own",
        GramianWeighting._hparams["head_grad"].check,
        "heads get their own scaled loss's gradient (LibMTL) or the IMTL-G weighted one",
    )

    def _step(self, inputs: StepInputs) -> StepInfo:
        s = self.scales.detach()
        factors = torch.exp(s.to(inputs.losses.device))
        scaled = copy.copy(inputs)
        # exp(s_k) L_k with the factor detached: the engine's per-task gradients are those of the
        # scaled losses (the -s_k term has none); s's own gradient is written below
        cast = [factors[k].to(v.dtype) for k, v in enumerate(inputs.values)]
        scaled.values = [v * c for v, c in zip(inputs.values, cast, strict=True)]
        info = super()._step(scaled)
        e = torch.stack(cast).to(torch.float64)  # the factors exactly as applied
        info.extras["scales"] = e.detach().clone()
        if info.weights is not None:
            info.weights = info.weights.to(e) * e
        if info.gramian is not None:
            info.gramian = info.gramian / (e[:, None] * e[None, :])
        if info.grad_norms is not None:
            info.grad_norms = info.grad_norms / e
        self._write_scale_gradient(inputs)
        return info

    def _write_scale_gradient(self, inputs: StepInputs) -> None:
        """``d/ds_k [exp(s_k) L_k - s_k] = exp(s_k) L_k - 1`` for the active tasks, scaled like the
        losses under a GradScaler (accumulated, as ``backward`` does)."""
        s = self.scales.detach().to(torch.float64)
        losses = inputs.losses.to(s.device, torch.float64)
        active = inputs.active.to(s.device)
        grad = torch.where(active, torch.exp(s) * losses - 1.0, torch.zeros_like(s)) * inputs.scale
        grad = grad.to(self.scales.dtype)
        if self.scales.grad is None:
            self.scales.grad = grad
        else:
            self.scales.grad.add_(grad)
