"""MGDA and MGDA-UB: the min-norm point of the convex hull of task gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.core.engine import GradientEngine, HeadGrad
from mtlkit.errors import EngineError, TaskError
from mtlkit.methods.base import GramianWeighting, Level
from mtlkit.methods.min_norm import min_norm_weights
from mtlkit.methods.registry import register

Normalization = Literal["none", "l2", "loss", "loss+"]
_EPS = 1e-12


@register("mgda")
class MGDA(GramianWeighting):
    """Multiple-gradient descent (Désidéri, 2012) as in Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.

    The shared direction is ``d = scale * J^T w*`` with ``w* = argmin_{w in simplex} ||J^T w||``,
    solved exactly from the Gramian (:func:`~mtlkit.methods.min_norm.min_norm_weights`). With
    ``level="representation"`` the Gramian is taken w.r.t. the shared representation: the paper's
    MGDA-UB upper-bound approximation (elementwise inner products over the whole batch, as in the
    official code).

    Args:
        normalization: gradient normalisation seen by the solver (official options): ``"none"``
            (default, as in the nash-mtl and LibMTL defaults), ``"l2"`` (unit gradients),
            ``"loss"`` (divide by L_k), ``"loss+"`` (by L_k * ||g_k||; the official CelebA setting).
        normalize_final: ``False`` (official isl-org behaviour): the solver's weights multiply the
            raw gradients. ``True`` (LibMTL): the normalised gradients are combined, i.e. the
            effective weight of task k is ``w*_k / n_k``.
        scale: overall factor (1 in the official code; nash-mtl uses K: pass ``"num_tasks"``).
        warm_start: start the solver from the previous step's solution (same result, found
            faster; the previous solution is part of the method's state).
        level, head_grad, engine: see :class:`~mtlkit.methods.base.GramianWeighting`. Heads get
            the weighted gradient by default, as in the official code's final weighted backward.

    Tasks without a labelled sample in the batch are left out of the solve (weight 0); a zero
    gradient otherwise makes the min-norm point zero, which is MGDA's correct answer.
    """

    name = "mgda"

    def __init__(
        self,
        normalization: Normalization = "none",
        normalize_final: bool = False,
        scale: float | Literal["num_tasks"] = 1.0,
        warm_start: bool = True,
        level: Level = "parameter",
        head_grad: HeadGrad | None = None,
        engine: GradientEngine | None = None,
    ) -> None:
        super().__init__(level=level, head_grad=head_grad, engine=engine)
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise EngineError(f"MGDA normalization must be none, l2, loss or loss+, got {normalization!r}.")
        if scale != "num_tasks" and not (isinstance(scale, (int, float)) and scale > 0):
            raise EngineError(f"MGDA scale must be a positive number or 'num_tasks', got {scale!r}.")
        self.normalization = normalization
        self.normalize_final = normalize_final
        self.scale = scale
        self.warm_start = warm_start
        self._previous: Tensor | None = None

    def _norms(self, gram: Tensor, losses: Tensor, active: Tensor) -> Tensor:
        if self.normalization == "none":
            return torch.ones_like(gram.diagonal())
        active = active.to(gram.device)
        if self.normalization in ("loss", "loss+") and bool(((losses <= 0) & active.to(losses.device)).any()):
            raise TaskError(
                f"MGDA normalization {self.normalization!r} needs positive losses, got "
                f"{losses.tolist()}; use 'none' or 'l2' for losses that can be <= 0."
            )
        grad_norm = gram.diagonal().clamp_min(0).sqrt()
        if self.normalization == "l2":
            return torch.where(active, grad_norm + _EPS, torch.ones_like(grad_norm))
        lk = losses.to(device=gram.device, dtype=gram.dtype)
        n = lk if self.normalization == "loss" else lk * grad_norm + _EPS
        return torch.where(active, n, torch.ones_like(n))  # inactive tasks are not solved for

    def weights(self, gram: Tensor, losses: Tensor, active: Tensor) -> Tensor:
        n = self._norms(gram, losses, active)
        w = min_norm_weights(
            gram / (n[:, None] * n[None, :]), active, init=self._previous if self.warm_start else None
        )
        self._previous = w
        if self.normalize_final:
            w = w / n
        scale = float(len(w)) if self.scale == "num_tasks" else float(self.scale)
        return w * scale

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["previous_weights"] = self._previous.detach().cpu() if self._previous is not None else None
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        prev = state.get("previous_weights")
        self._previous = prev.clone() if prev is not None else None

    def __repr__(self) -> str:
        return (
            f"MGDA(normalization={self.normalization!r}, normalize_final={self.normalize_final}, "
            f"scale={self.scale!r}, level={self.level!r}, head_grad={self.head_grad!r})"
        )
