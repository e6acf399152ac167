"""Preference vectors over the tasks: evenly spread rays for fronts, Dirichlet draws for training.

A preference ``r`` has one non-negative entry per task and sums to 1 (a point of the simplex). The
preference-aware methods (:mod:`mtlkit.methods.preferences`) and the preference-conditioned models
(:mod:`mtlkit.models.preference_input`) take it through ``set_preference``; the Pareto layer draws
or sweeps it (:mod:`mtlkit.pareto`).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from mtlkit.errors import ConfigError


def check_preference(preference: Tensor | list[float], tasks: int | None = None) -> Tensor:
    """``preference`` as a float64 vector that sums to 1, after checking it is a finite, non-negative
    vector with a positive sum (and ``tasks`` entries, when given)."""
    r = torch.as_tensor(preference, dtype=torch.float64).detach().reshape(-1)
    if r.numel() == 0 or (tasks is not None and r.numel() != tasks):
        raise ConfigError(f"preference: need {tasks or 'one or more'} entries, got {r.numel()}.")
    if not torch.isfinite(r).all() or (r < 0).any() or not r.sum() > 0:
        raise ConfigError(
            f"preference: need finite, non-negative entries with a positive sum, got {r.tolist()}."
        )
    return r / r.sum()


def circle_rays(count: int, start: float = 0.0, end: float = math.pi / 2) -> Tensor:
    """``count`` two-task preferences at evenly spaced angles on ``[start, end]`` (radians; the
    quarter circle by default, as PMTL's and EPO's official scripts), normalised to sum 1.
    The end points (pure single-task preferences) are moved in by 1e-3 of the arc so every entry
    is positive."""
    if count < 1 or not 0 <= start < end <= math.pi / 2:
        raise ConfigError(
            f"circle_rays: need count >= 1 and 0 <= start < end <= pi/2, got {count}, {start}, {end}."
        )
    margin = 1e-3 * (end - start)
    angles = torch.linspace(start + margin, end - margin, count, dtype=torch.float64)
    if count == 1:
        angles = torch.tensor([(start + end) / 2], dtype=torch.float64)
    rays = torch.stack([angles.cos(), angles.sin()], dim=1)
    return rays / rays.sum(dim=1, keepdim=True)


def simplex_lattice(tasks: int, divisions: int, interior: bool = True) -> Tensor:
    """Das & Dennis's lattice: every preference with entries in ``{0, 1/H, ..., 1}`` (``H =
    divisions``) that sums to 1. With ``interior`` the zero entries are lifted to ``1e-3 / tasks``
    (and the rows renormalised), so every preference is positive."""
    if tasks < 1 or divisions < 1:
        raise ConfigError(f"simplex_lattice: need tasks >= 1 and divisions >= 1, got {tasks}, {divisions}.")
    rows = [c for c in itertools.product(range(divisions + 1), repeat=tasks) if sum(c) == divisions]
    lattice = torch.tensor(sorted(rows, reverse=True), dtype=torch.float64) / divisions
    if interior:
        lattice = lattice.clamp_min(1e-3 / tasks)
        lattice = lattice / lattice.sum(dim=1, keepdim=True)
    return lattice


def dirichlet(tasks: int, alpha: float, generator: torch.Generator, count: int | None = None) -> Tensor:
    """Draws from the symmetric Dirichlet ``Dir(alpha, ..., alpha)`` with ``generator`` (one vector,
    or ``count`` rows), as normalised Gamma draws, floored at 1e-12 so no entry is exactly 0."""
    if tasks < 1 or not alpha > 0:
        raise ConfigError(f"dirichlet: need tasks >= 1 and alpha > 0, got {tasks}, {alpha}.")
    shape = (count or 1, tasks)
    concentration = torch.full(shape, float(alpha), dtype=torch.float64)
    # torch's Gamma sampler takes no generator, so draw it from uniforms: Marsaglia-Tsang would need
    # a rejection loop; the inverse of Gamma's CDF is exact and generator-driven through torch.special
    u = torch.rand(shape, dtype=torch.float64, generator=generator).clamp(1e-300, 1 - 1e-16)
    gamma = _gamma_quantile(concentration, u)
    draws = gamma.clamp_min(1e-300)
    draws = draws / draws.sum(dim=1, keepdim=True)
    draws = draws.clamp_min(1e-12)
    draws = draws / draws.sum(dim=1, keepdim=True)
    return draws[0] if count is None else draws


def _gamma_quantile(shape: Tensor, u: Tensor, iterations: int = 60) -> Tensor:
    """The Gamma(shape, 1) quantile of ``u`` by bisection on log x of the regularised lower
    incomplete gamma function (monotone, so bisection always converges; 60 halvings of the
    log-range reach float64 resolution)."""
    lo = torch.full_like(u, -700.0)
    hi = torch.full_like(u, math.log(1e4) + torch.log1p(shape).max().item())
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = torch.special.gammainc(shape, mid.exp()) < u
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return ((lo + hi) / 2).exp()
