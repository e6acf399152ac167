"""RLW: random loss weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.errors import TaskError
from mtlkit.methods.base import LossWeighting
from mtlkit.methods.registry import register

Distribution = Literal["normal", "uniform", "dirichlet"]


@register("rlw")
class RLW(LossWeighting):
    """Random loss weighting: Lin, Ye, Xu, Shi, Zhang, Kwok, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.

    Every step draws fresh weights on the simplex and minimises ``sum_k w_k L_k``.

    Args:
        distribution: ``"normal"`` (default, the paper's and LibMTL's choice: ``softmax`` of
            ``N(0, I)`` draws), ``"uniform"`` (``softmax`` of ``U(0, 1)`` draws) or ``"dirichlet"``
            (``Dir(1, ..., 1)`` directly), three of the paper's variants.
        seed: seed of the method's own generator. ``None`` (default) takes one from torch's global
            generator at the first step, so ``torch.manual_seed`` makes runs reproducible. The
            generator state is part of :meth:`state_dict`, so a resumed run draws the same weights.

    Tasks without a labelled sample in the batch get weight 0; the others share the unit mass
    (the draw itself does not depend on which tasks are labelled).
    """

    name = "rlw"

    def __init__(self, distribution: Distribution = "normal", seed: int | None = None) -> None:
        super().__init__()
        if distribution not in ("normal", "uniform", "dirichlet"):
            raise TaskError(f"RLW distribution must be normal, uniform or dirichlet, got {distribution!r}.")
        self.distribution = distribution
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _gen(self) -> torch.Generator:
        if self._generator is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self._generator = torch.Generator().manual_seed(seed)
        return self._generator

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

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self._generator.get_state() if self._generator is not None else None
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("generator")
        if saved is not None:
            self._generator = torch.Generator()
            self._generator.set_state(saved)

    def __repr__(self) -> str:
        return f"RLW(distribution={self.distribution!r}, seed={self.seed!r})"
