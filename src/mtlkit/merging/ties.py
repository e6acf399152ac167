"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging.base import (
    Loader,
    Merger,
    check_fraction,
    check_weights,
    register,
    task_vector,
)

TRIM_SCOPES = ("global", "per_tensor")
SIGN_RULES = ("mass", "count")
AGGREGATES = ("disjoint_mean", "disjoint_sum", "max")
#: how many of n entries "the top density fraction" is: ceil(d n) (ours), int(d n) (mergekit) or
#: int(d n) + 1 (the TIES code's kthvalue, which FusionBench keeps)
ROUNDINGS = ("ceil", "floor", "ties_code")
#: the aggregates of the methods that merge by TIES's election without its own trim (DARE, DELLA)
DISJOINT_AGGREGATES = AGGREGATES[:2]


def keep_count(n: int, density: float, rounding: str = "ceil") -> int:
    """The number of entries the top ``density`` fraction of ``n`` keeps (see :data:`ROUNDINGS`)."""
    if rounding == "ceil":  # exact: 0.7 * 10 is 7.000000000000001 in floating point
        return max(1, math.ceil(Fraction(repr(density)) * n))
    if rounding == "floor":
        return max(1, int(density * n))
    if rounding == "ties_code":
        return min(n, int(density * n) + 1)
    raise unknown_name("rounding", rounding, ROUNDINGS)


def keep_threshold(magnitudes: Tensor, density: float, rounding: str = "ceil") -> float:
    """The smallest magnitude kept when the top ``density`` fraction of ``magnitudes`` (by value)
    is kept: the :func:`keep_count`-th largest. Ties at the threshold are all kept."""
    n = magnitudes.numel()
    keep = keep_count(n, density, rounding)
    if keep >= n:
        return float("-inf")
    return float(torch.kthvalue(magnitudes.reshape(-1), n - keep + 1).values)


def elect_and_merge(
    taus: Sequence[Tensor], weights: Sequence[float], sign_rule: str, aggregate: str
) -> Tensor:
    """TIES steps 2 and 3 on (already trimmed) task vectors of one tensor, one task at a time:
    a few tensors of working memory besides the task vectors, never a T-fold stack."""
    scaled = [t if w == 1.0 else t * w for w, t in zip(weights, taus, strict=True)]
    if sign_rule == "mass":
        total = torch.zeros_like(scaled[0])
        for t in scaled:
            total.add_(t)
        # a coordinate whose mass cancels exactly takes the sign of the tensor's total mass
        positive = total > 0 if float(total.sum()) < 0 else total >= 0
        del total
    else:  # the majority of signs, ties to + (mergekit's "count")
        votes = torch.zeros(scaled[0].shape, dtype=torch.int64)
        for t in scaled:
            votes.add_((t > 0).to(torch.int64)).sub_((t < 0).to(torch.int64))
        positive = votes >= 0
        del votes
    out = torch.zeros_like(scaled[0])
    if aggregate == "max":
        best = torch.zeros_like(scaled[0])
        for t in scaled:
            agree = torch.where(positive, t > 0, t < 0)
            better = agree & (t.abs() > best)
            out = torch.where(better, t, out)
            best = torch.where(better, t.abs(), best)
        return out
    divisor = torch.zeros_like(scaled[0]) if aggregate == "disjoint_mean" else None
    for w, t in zip(weights, scaled, strict=True):
        agree = torch.where(positive, t > 0, t < 0)
        out.add_(torch.where(agree, t, torch.zeros((), dtype=t.dtype)))
        if divisor is not None:
            divisor.add_(agree.to(t.dtype), alpha=abs(w))
    if divisor is None:
        return out
    return torch.where(divisor > 0, out / divisor.clamp_min(1e-300), torch.zeros((), dtype=out.dtype))


@register("ties")
class TIES(Merger):
    """TIES-Merging (Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference
    When Merging Models", NeurIPS 2023).

    1. Trim: keep the top ``density`` fraction of each task vector by magnitude, zero the rest;
    2. elect a sign per coordinate;
    3. merge only the task values that agree with it; ``theta_m = theta_0 + scaling * tau_m``.

    The reference libraries differ silently on each step; every variant is a switch here:

    - ``trim_scope``: ``"global"`` ranks each task vector over the whole model (the paper's code and
      FusionBench; needs a first pass over the model, one task at a time) or ``"per_tensor"``
      (mergekit; streams);
    - ``sign_rule``: ``"mass"`` (the sign of the summed values, the paper's) or ``"count"`` (the
      majority of signs, ties to +; mergekit's option);
    - ``aggregate``: ``"disjoint_mean"`` (the paper), ``"disjoint_sum"`` (FusionBench's default,
      with scaling 0.3) or ``"max"`` (the largest agreeing magnitude);
    - ``rounding``: how many entries "the top ``density``" is, ``"ceil"`` (ceil(density n), ours),
      ``"floor"`` (int(density n), mergekit) or ``"ties_code"`` (int(density n) + 1, what the
      TIES code's ``kthvalue`` keeps, and FusionBench with it).

    Defaults: density 0.2 (k = 20%), global trim, mass sign, disjoint mean, scaling 1.0 (the
    paper tunes it on validation, typically near 1 with the disjoint mean). With ``weights`` the
    task vectors are weighted before the election and the mean divides by the agreeing weights
    (mergekit). A coordinate whose summed value is exactly 0 takes the sign of the tensor's total
    (FusionBench uses the whole model's total; only exact cancellations differ).
    """

    writes_inputs = True  # trims the task vectors in place on the driver's copies

    def __init__(
        self,
        density: float = 0.2,
        scaling: float = 1.0,
        trim_scope: str = "global",
        sign_rule: str = "mass",
        aggregate: str = "disjoint_mean",
        weights: Sequence[float] | None = None,
        rounding: str = "ceil",
    ) -> None:
        if rounding not in ROUNDINGS:
            raise unknown_name("rounding", rounding, ROUNDINGS)
        self.rounding = rounding
        if trim_scope not in TRIM_SCOPES:
            raise unknown_name("trim_scope", trim_scope, TRIM_SCOPES)
        if sign_rule not in SIGN_RULES:
            raise unknown_name("sign_rule", sign_rule, SIGN_RULES)
        if aggregate not in AGGREGATES:
            raise unknown_name("aggregate", aggregate, AGGREGATES)
        self.density = check_fraction(density, "density", "ties", low_open=True)
        self.scaling = float(scaling)
        self.trim_scope, self.sign_rule, self.aggregate = trim_scope, sign_rule, aggregate
        self.weights = None if weights is None else [float(w) for w in weights]
        self._thresholds: list[float] | None = None

    @property
    def granularity(self) -> str:
        return "model" if self.trim_scope == "global" else "tensor"

    def begin(self) -> None:
        self._thresholds = None

    def prepare(self, names: Sequence[str], pretrained: Loader | None, experts: Sequence[Loader]) -> None:
        if self.trim_scope != "global":
            return
        if pretrained is None:
            raise ConfigError("ties needs the pretrained model.")
        thresholds = []
        for load in experts:  # one task at a time: P magnitudes in memory, not T x P
            mags = torch.cat([task_vector(load(n), pretrained(n)).abs().reshape(-1) for n in names])
            thresholds.append(
                keep_threshold(mags, self.density, self.rounding) if mags.numel() else float("inf")
            )
        self._thresholds = thresholds

    def trim(self, tau: Tensor, index: int) -> Tensor:
        """Zero (in place) all but the kept entries of ``tau``."""
        if self.trim_scope == "global":
            if self._thresholds is None:
                raise ConfigError(
                    "ties(trim_scope='global') merges through mk.merging.merge (it needs a pass over the model)."
                )
            threshold = self._thresholds[index]
        else:
            threshold = (
                keep_threshold(tau.abs(), self.density, self.rounding) if tau.numel() else float("inf")
            )
        return tau.masked_fill_(tau.abs() < threshold, 0.0)

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        w = check_weights(self.weights, len(experts), "ties")
        taus = [self.trim(e.sub_(pretrained), i) for i, e in enumerate(experts)]  # the experts are ours
        return elect_and_merge(taus, w, self.sign_rule, self.aggregate).mul_(self.scaling).add_(pretrained)
