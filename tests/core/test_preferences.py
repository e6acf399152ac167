"""Preference vectors: rays, the simplex lattice, and generator-driven Dirichlet draws."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from mtlkit.core.preferences import check_preference, circle_rays, dirichlet, simplex_lattice
from mtlkit.errors import ConfigError


def test_circle_rays_are_positive_and_sum_to_one() -> None:
    rays = circle_rays(5)
    assert rays.shape == (5, 2)
    assert torch.allclose(rays.sum(1), torch.ones(5, dtype=torch.float64))
    assert (rays > 0).all()
    # evenly spaced angles, first task's share falling
    angles = torch.atan2(rays[:, 1], rays[:, 0])
    assert torch.allclose(angles.diff(), angles.diff()[0].expand(4), atol=1e-12)
    assert (rays[:, 0].diff() < 0).all()
    assert torch.allclose(circle_rays(1), torch.tensor([[0.5, 0.5]], dtype=torch.float64))


def test_simplex_lattice_counts_and_sums() -> None:
    for m, h in [(2, 4), (3, 5), (4, 3)]:
        lattice = simplex_lattice(m, h)
        assert len(lattice) == math.comb(h + m - 1, m - 1)
        assert torch.allclose(lattice.sum(1), torch.ones(len(lattice), dtype=torch.float64))
        assert (lattice > 0).all()
    exact = simplex_lattice(3, 2, interior=False)
    assert {tuple(r) for r in (exact * 2).round().int().tolist()} == {
        (2, 0, 0),
        (1, 1, 0),
        (1, 0, 1),
        (0, 2, 0),
        (0, 1, 1),
        (0, 0, 2),
    }


@pytest.mark.parametrize("alpha", [0.2, 1.0, 1.2, 5.0])
def test_dirichlet_matches_its_distribution(alpha: float) -> None:
    draws = dirichlet(3, alpha, torch.Generator().manual_seed(0), count=4000)
    assert torch.allclose(draws.sum(1), torch.ones(4000, dtype=torch.float64))
    assert (draws > 0).all()
    # each marginal of Dir(a, a, a) is Beta(a, 2a)
    result = stats.kstest(draws[:, 0].numpy(), stats.beta(alpha, 2 * alpha).cdf)
    assert result.pvalue > 1e-3


def test_dirichlet_is_reproducible_from_its_generator() -> None:
    a = dirichlet(2, 0.2, torch.Generator().manual_seed(7))
    b = dirichlet(2, 0.2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (2,)


def test_check_preference() -> None:
    assert torch.allclose(check_preference([1.0, 3.0]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    for bad in ([], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ConfigError):
            check_preference(bad)
    with pytest.raises(ConfigError, match="2 entries"):
        check_preference([1.0, 1.0, 1.0], tasks=2)
    with pytest.raises(ConfigError):
        circle_rays(0)
    with pytest.raises(ConfigError):
        dirichlet(2, 0.0, torch.Generator())
