"""MGDA and MGDA-UB: the min-norm point of the convex hull of task gradients."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.errors import NonPositiveLossError
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import boolean, hparam, number, one_of
from mtlkit.methods.min_norm import min_norm_weights
from mtlkit.methods.registry import register, register_variant

Normalization = Literal["none", "l2", "loss", "loss+"]
_EPS = 1e-12


@register("mgda")
class MGDA(GramianWeighting):
    """Multiple-gradient descent (Désidéri, 2012) as in Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.

    The shared direction is ``d = scale * J^T w*`` with ``w* = argmin_{w in simplex} ||J^T w||``,
    solved exactly from the Gramian (:func:`~mtlkit.methods.min_norm.min_norm_weights`). With
    ``level="representation"`` (the registry name ``mgda_ub``) the Gramian is taken w.r.t. the
    shared representation: the paper's MGDA-UB upper-bound approximation (elementwise inner
    products over the whole batch, as in the official code). Heads get the weighted gradient by
    default, as in the official code's final weighted backward. A zero gradient makes the min-norm
    point zero, which is MGDA's correct answer. ``warm_start`` starts the solver from the previous
    step's solution (same result, found faster; the solution is part of the state).
    """

    normalization: Normalization = hparam(
        "none",
        one_of("none", "l2", "loss", "loss+"),
        "gradient normalisation seen by the solver: none (nash-mtl and LibMTL default), l2 (unit "
        "gradients), loss (divide by L_k), loss+ (by L_k ||g_k||; the official CelebA setting)",
    )
    normalize_final: bool = hparam(
        False,
        boolean(),
        "False (official isl-org): the weights multiply the raw gradients; True (LibMTL): the "
        "normalised gradients are combined (effective weight w_k / n_k)",
    )
    scale: float | Literal["num_tasks"] = hparam(
        1.0, number(gt=0) | one_of("num_tasks"), "overall factor (1 official; nash-mtl uses K: 'num_tasks')"
    )
    warm_start: bool = hparam(True, boolean(), "start the solver from the previous solution")
    previous: Tensor

    def _build(self, tasks: TaskSet) -> None:
        self.register_buffer("previous", torch.zeros(len(tasks), dtype=torch.float64))

    def _norms(self, gram: Tensor, losses: Tensor) -> Tensor:
        if self.normalization == "none":
            return torch.ones_like(gram.diagonal())
        if self.normalization in ("loss", "loss+") and bool((losses <= 0).any()):
            raise NonPositiveLossError(
                f"MGDA normalization {self.normalization!r} needs positive losses, got "
                f"{losses.tolist()}; use 'none' or 'l2' for losses that can be <= 0."
            )
        grad_norm = gram.diagonal().clamp_min(0).sqrt()
        if self.normalization == "l2":
            return grad_norm + _EPS
        return losses if self.normalization == "loss" else losses * grad_norm + _EPS

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        n = self._norms(gramian, losses)
        index = self.active_index
        init = (
            self.previous[index.to(self.previous.device)] if self.warm_start and index is not None else None
        )
        w = min_norm_weights(gramian / (n[:, None] * n[None, :]), init=init)
        if index is not None:
            previous = torch.zeros_like(self.previous)
            previous[index.to(previous.device)] = w.to(previous)
            self.previous = previous
        if self.normalize_final:
            w = w / n
        scale = float(len(self.previous)) if self.scale == "num_tasks" else float(self.scale)
        return w * scale


register_variant("mgda_ub", MGDA, level="representation")
# ParetoGNN (Ju et al., ICLR 2023): MGDA over pretext losses on the shared encoder, weights from
# unit-normalised gradients applied to the raw losses (its default grad_norm='l2'); the official
# Frank-Wolfe solver (250 iterations) is replaced by the exact min-norm solver
register_variant("paretognn", MGDA, normalization="l2")
