"""DELLA: magnitude-ranked random pruning (MAGPRUNE), then sign election and disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging.base import RESCALES, Merger, check_weights, register, restore_l1, tensor_uniform
from mtlkit.merging.ties import DISJOINT_AGGREGATES, SIGN_RULES, elect_and_merge


def keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """``p = density - epsilon + 2 epsilon * rank`` with ``rank`` the magnitude rank normalised to
    [0, 1] within each row (the whole tensor for a vector): larger entries are kept more often."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(tau.dtype)
    n = rows.shape[1]
    normalised = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    return (density - epsilon + 2 * epsilon * normalised).reshape(tau.shape)


@register("della")
class DELLA(Merger):
    """DELLA-Merging (Deep, Bhardwaj, Majumder, Poria, "DELLA-Merging: Reducing Interference in
    Model Merging through Magnitude-Based Sampling", 2024).

    MAGPRUNE: each entry of a task vector is kept with probability ``p_i = density - epsilon +
    2 epsilon r_i`` (``r_i`` its magnitude rank in [0, 1] within its row, as mergekit ranks them)
    and rescaled by ``1 / p_i`` (``rescale="exact"``; ``"l1"`` restores the tensor's L1 norm,
    mergekit's option); then TIES's sign election and disjoint mean, and ``theta_m = theta_0 +
    scaling * tau_m`` (``aggregate="disjoint_sum"`` for mergekit's ``normalize: false``; density 1
    keeps everything, as mergekit).

    Defaults (mtlkit's; mergekit requires ``density`` and ``epsilon`` explicitly and the paper tunes
    them per setting): density 0.5, epsilon 0.1, scaling 1.0. Masks are seeded per tensor and
    expert, as DARE's.
    """

    def __init__(
        self,
        density: float = 0.5,
        epsilon: float = 0.1,
        scaling: float = 1.0,
        rescale: str = "exact",
        sign_rule: str = "mass",
        seed: int = 0,
        weights: Sequence[float] | None = None,
        aggregate: str = "disjoint_mean",
    ) -> None:
        if aggregate not in DISJOINT_AGGREGATES:
            raise unknown_name("aggregate", aggregate, DISJOINT_AGGREGATES)
        self.aggregate = aggregate
        if rescale not in RESCALES:
            raise unknown_name("rescale", rescale, RESCALES)
        if sign_rule not in SIGN_RULES:
            raise unknown_name("sign_rule", sign_rule, SIGN_RULES)
        if density < 1 and not (density - epsilon > 0 and density + epsilon <= 1 and epsilon >= 0):
            raise ConfigError(
                f"della: need 0 < density - epsilon and density + epsilon <= 1, got {density}, {epsilon}."
            )
        self.density, self.epsilon, self.scaling = float(density), float(epsilon), float(scaling)
        self.rescale, self.sign_rule, self.seed = rescale, sign_rule, int(seed)
        self.weights = None if weights is None else [float(w) for w in weights]

    def prune(self, name: str, index: int, tau: Tensor) -> Tensor:
        if self.density >= 1:  # nothing is dropped (as mergekit)
            return tau
        probs = keep_probabilities(tau, self.density, self.epsilon)
        keep = tensor_uniform(self.seed, name, index, tau.shape) < probs
        kept = torch.where(keep, tau, torch.zeros_like(tau))
        if self.rescale == "exact":
            return kept / probs
        return restore_l1(kept, float(tau.abs().sum()))

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        w = check_weights(self.weights, len(experts), "della")
        taus = [self.prune(name, i, e - pretrained) for i, e in enumerate(experts)]
        return pretrained + self.scaling * elect_and_merge(taus, w, self.sign_rule, self.aggregate)
