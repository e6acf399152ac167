"""RLW: random loss weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlkit.methods.hparams import hparam, none, number, one_of
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.owned_generator import OwnedGenerator
from mtlkit.methods.registry import register

Distribution = Literal["normal", "uniform", "dirichlet"]


@register("rlw")
class RLW(OwnedGenerator, LossWeighting):
    """Random loss weighting: Lin, Ye, Xu, Shi, Zhang, Kwok, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.

    Every step draws fresh weights on the simplex and minimises ``sum_k w_k L_k``:
    ``"normal"`` (the paper's and LibMTL's choice) is ``softmax`` of ``N(0, I)`` draws,
    ``"uniform"`` ``softmax`` of ``U(0, 1)`` draws, ``"dirichlet"`` ``Dir(1, ..., 1)`` directly
    (three of the paper's variants). The method's own generator's state is part of the
    checkpoint, so a resumed run draws the same weights. Tasks without a labelled sample get
    weight 0; the others share the unit mass (the draw does not depend on which are labelled).
    """

    distribution: Distribution = hparam(
        "normal", one_of("normal", "uniform", "dirichlet"), "the weight distribution"
    )
    seed: int | None = hparam(
        None,
        number(ge=0, integer=True) | none(),
        "seed of the method's generator; None takes one from torch's global generator at the first step",
    )

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        k = len(losses)
        gen = self._gen()
        if self.distribution == "dirichlet":  # Gamma(1) = Exp(1) draws normalised: Dir(1, ..., 1)
            logits = torch.empty(k, dtype=torch.float64).exponential_(1.0, generator=gen).log()
        elif self.distribution == "uniform":
            logits = torch.rand(k, dtype=torch.float64, generator=gen)
        else:
            logits = torch.randn(k, dtype=torch.float64, generator=gen)
        logits = torch.where(active, logits.to(losses.device, non_blocking=True), -torch.inf)
        # all tasks unlabelled: softmax of all -inf is NaN -> weight 0 (no host sync needed)
        return torch.softmax(logits, dim=0).nan_to_num(0.0).to(losses.dtype)
