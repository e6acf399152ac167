"""DARE: drop and rescale the task vectors, then merge them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import unknown_name
from mtlkit.merging.base import (
    RESCALES,
    Merger,
    check_fraction,
    check_weights,
    register,
    restore_l1,
    tensor_uniform,
)
from mtlkit.merging.ties import DISJOINT_AGGREGATES, SIGN_RULES, elect_and_merge

COMBINES = ("task_arithmetic", "ties")


@register("dare")
class DARE(Merger):
    """DARE (Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", ICML 2024).

    Each task vector keeps every entry with probability ``1 - drop_rate`` (independent Bernoulli
    masks) and is rescaled so that its expectation is unchanged: ``tau' = m * tau / (1 - p)``
    (``rescale="exact"``, the paper's). ``rescale="l1"`` instead restores each tensor's L1 norm
    (mergekit's choice; a silent difference between the two libraries). The rescaled vectors are
    then merged by Task Arithmetic (``combine="task_arithmetic"``) or by TIES's sign election and
    disjoint merge without its magnitude trim (``combine="ties"``; ``aggregate`` chooses the
    disjoint mean, the paper's, or sum, mergekit's ``dare_ties`` default).

    Defaults: drop rate 0.5 and scaling 0.3 (FusionBench's DARE+TA; the paper drops up to 0.9-0.99
    for language-model fine-tunes). The masks come from ``seed``, the tensor's name and the
    expert's position, so streamed and in-memory merges are identical.
    """

    writes_inputs = True  # drops entries in place on the driver's copies

    def __init__(
        self,
        drop_rate: float = 0.5,
        scaling: float = 0.3,
        combine: str = "task_arithmetic",
        rescale: str = "exact",
        sign_rule: str = "mass",
        seed: int = 0,
        weights: Sequence[float] | None = None,
        aggregate: str = "disjoint_mean",
    ) -> None:
        if aggregate not in DISJOINT_AGGREGATES:
            raise unknown_name("aggregate", aggregate, DISJOINT_AGGREGATES)
        self.aggregate = aggregate
        if combine not in COMBINES:
            raise unknown_name("combine", combine, COMBINES)
        if rescale not in RESCALES:
            raise unknown_name("rescale", rescale, RESCALES)
        if sign_rule not in SIGN_RULES:
            raise unknown_name("sign_rule", sign_rule, SIGN_RULES)
        p = check_fraction(drop_rate, "drop_rate", "dare")
        if p >= 1.0:
            raise ValueError("dare: drop_rate must be below 1 (everything would be dropped).")
        self.drop_rate, self.scaling = p, float(scaling)
        self.combine, self.rescale, self.sign_rule, self.seed = combine, rescale, sign_rule, int(seed)
        self.weights = None if weights is None else [float(w) for w in weights]

    def drop(self, name: str, index: int, tau: Tensor) -> Tensor:
        """Drop and rescale ``tau`` in place."""
        before = float(tau.abs().sum()) if self.rescale == "l1" else 0.0
        tau.masked_fill_(tensor_uniform(self.seed, name, index, tau.shape) < self.drop_rate, 0.0)
        if self.rescale == "exact":
            return tau.div_(1.0 - self.drop_rate)
        return restore_l1(tau, before)

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        w = check_weights(self.weights, len(experts), "dare")
        taus = [self.drop(name, i, e.sub_(pretrained)) for i, e in enumerate(experts)]  # the experts are ours
        if self.combine == "ties":
            merged = elect_and_merge(taus, w, self.sign_rule, self.aggregate)
        else:
            merged = torch.zeros_like(pretrained)
            for wi, t in zip(w, taus, strict=True):
                merged.add_(t, alpha=wi)
        return merged.mul_(self.scaling).add_(pretrained)
