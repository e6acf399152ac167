"""Combination rules: how a normal agent weights its neighbours' intermediate models ``psi_l``.

- ``loss`` (the paper's rule): ``r_kl <- (1 - nu) r_kl + nu * l_k(psi_l; own batch)``; keep
  ``l`` only if ``r_kl <= r_kk``; ``c_kl = (1/r_kl) / sum over kept (1/r_kl')``. ``filter=False``
  is the unfiltered ablation.
- ``none`` (no cooperation), ``average`` (uniform over neighbours), ``distance`` (inverse
  accumulated squared distance ``||w_k(i-1) - psi_l(i)||^2``, no filter): the paper's baselines.
- ``krum``, ``trimmed_mean``, ``median``: the robust aggregators of :mod:`mtlkit.methods` applied to
  the neighbours' models (``f``: the number of Byzantine neighbours they tolerate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.methods.coordinate_median import coordinate_median
from mtlkit.methods.krum import krum_weights
from mtlkit.methods.trimmed_mean import trimmed_mean


def loss_weights(r: Tensor, own: Tensor | None = None) -> Tensor:
    """Row-stochastic weights from accumulated losses ``r[k, l]`` (NaN where ``l`` cannot serve
    ``k``): sources with ``r[k, l] <= r[k, own[k]]`` kept (``own`` defaults to the diagonal) and
    weighted by inverse loss, the others 0."""
    index = own if own is not None else torch.arange(r.shape[0], device=r.device)
    mine = r.gather(1, index.view(-1, 1))
    kept = torch.isfinite(r) & (r <= mine)
    inverse = torch.where(kept, 1.0 / r.clamp_min(1e-300), torch.zeros_like(r))
    return inverse / inverse.sum(dim=1, keepdim=True).clamp_min(1e-300)


class Rule:
    """One normal agent's rule over its ``m`` neighbours, its own model at position ``own``."""

    needs_losses = False

    def __init__(self, m: int, own: int) -> None:
        self.m, self.own = m, own

    def combine(self, psis: Tensor, losses: Tensor | None, previous: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(weights over the neighbours or None, the combined model)``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if set(state) != set(self.state_dict()):
            raise ConfigError(
                f"{type(self).__name__} state has keys {sorted(state)}, expected {sorted(self.state_dict())}."
            )


def _weighted(weights: Tensor, psis: Tensor) -> tuple[Tensor, Tensor]:
    return weights, weights.to(psis) @ psis


class NoCooperation(Rule):
    def combine(self, psis, losses, previous):
        w = torch.zeros(self.m, dtype=torch.float64)
        w[self.own] = 1.0
        return _weighted(w, psis)


class Average(Rule):
    def combine(self, psis, losses, previous):
        return _weighted(torch.full((self.m,), 1.0 / self.m, dtype=torch.float64), psis)


class Accumulated(Rule):
    """A rule with a per-neighbour accumulator ``a <- (1 - nu) a + nu * value`` (started at ``r0``)."""

    def __init__(self, m: int, own: int, nu: float = 0.1, r0: float = 1.0) -> None:
        super().__init__(m, own)
        if not (0 < nu <= 1 and r0 > 0):
            raise ConfigError(f"The accumulated rules need 0 < nu <= 1 and r0 > 0, got nu={nu}, r0={r0}.")
        self.nu = nu
        self.acc = torch.full((m,), float(r0), dtype=torch.float64)

    def accumulate(self, values: Tensor) -> None:
        self.acc = (1 - self.nu) * self.acc + self.nu * values.detach().to(torch.float64).cpu()

    def state_dict(self) -> dict[str, Tensor]:
        return {"acc": self.acc.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        if state["acc"].shape != self.acc.shape:
            raise ConfigError(
                f"The saved accumulator has shape {tuple(state['acc'].shape)}, expected {tuple(self.acc.shape)}."
            )
        self.acc = state["acc"].to(torch.float64).clone()


class LossBased(Accumulated):
    needs_losses = True

    def __init__(self, m: int, own: int, nu: float = 0.1, r0: float = 1.0, filter: bool = True) -> None:
        super().__init__(m, own, nu, r0)
        self.filter = filter

    def combine(self, psis, losses, previous):
        if losses is not None:
            self.accumulate(losses)
        if self.filter:
            w = loss_weights(self.acc[None], torch.tensor([self.own]))[0]
        else:
            inverse = 1.0 / self.acc.clamp_min(1e-300)
            w = inverse / inverse.sum()
        return _weighted(w, psis)


class DistanceBased(Accumulated):
    def combine(self, psis, losses, previous):
        self.accumulate((psis - previous).pow(2).sum(1))
        inverse = 1.0 / self.acc.clamp_min(1e-300)
        return _weighted(inverse / inverse.sum(), psis)


class KrumRule(Rule):
    def __init__(self, m: int, own: int, f: int = 1) -> None:
        super().__init__(m, own)
        self.f = f

    def combine(self, psis, losses, previous):
        flat = psis.to(torch.float64)
        return _weighted(krum_weights(flat @ flat.T, self.f).cpu(), psis)


class TrimmedMeanRule(Rule):
    def __init__(self, m: int, own: int, f: int = 1) -> None:
        super().__init__(m, own)
        self.f = f

    def combine(self, psis, losses, previous):
        return None, trimmed_mean(psis, self.f)


class MedianRule(Rule):
    def combine(self, psis, losses, previous):
        return None, coordinate_median(psis)


RULES: dict[str, Callable[..., Rule]] = {
    "loss": LossBased,
    "none": NoCooperation,
    "average": Average,
    "distance": DistanceBased,
    "krum": KrumRule,
    "trimmed_mean": TrimmedMeanRule,
    "median": MedianRule,
}


def make_rule(name: str, m: int, own: int, **options: object) -> Rule:
    if name not in RULES:
        raise unknown_name("combination rule", name, RULES)
    try:
        return RULES[name](m, own, **options)
    except TypeError as exc:
        raise ConfigError(f"rule {name!r}: {exc}") from exc
