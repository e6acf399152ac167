"""Scaling selection on a validation callback."""

from __future__ import annotations

import warnings

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError


def problem():
    base = {"w": torch.zeros(3, dtype=torch.float64)}
    experts = {
        "a": {"w": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)},
        "b": {"w": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)},
    }
    target = torch.tensor([0.35, 0.35, 0.0], dtype=torch.float64)  # TA with scaling 0.35

    def evaluate(result):
        return -float((result.state_dict["w"] - target).pow(2).sum())

    return base, experts, evaluate


def test_grid_search_finds_the_validation_optimum():
    base, experts, evaluate = problem()
    found = mk.merging.select_scaling(base, experts, "task_arithmetic", evaluate)
    assert found.best == 0.35 and not found.on_boundary and len(found.scores) == 21
    torch.testing.assert_close(
        found.result.state_dict["w"], torch.tensor([0.35, 0.35, 0.0], dtype=torch.float64)
    )


def test_golden_section_converges_and_the_boundary_is_flagged():
    base, experts, evaluate = problem()
    found = mk.merging.select_scaling(
        base, experts, "ties", evaluate, search="golden", iterations=30, density=1.0, aggregate="disjoint_sum"
    )
    assert found.best == pytest.approx(0.35, abs=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edge = mk.merging.select_scaling(base, experts, "task_arithmetic", evaluate, values=[0.0, 0.1, 0.2])
    assert edge.best == 0.2 and edge.on_boundary and any("edge" in str(w.message) for w in caught)


def test_search_errors():
    base, experts, evaluate = problem()
    with pytest.raises(ConfigError, match="no scaling"):
        mk.merging.select_scaling(base, experts, "emr", evaluate)
    with pytest.raises(ConfigError, match="chooses scaling itself"):
        mk.merging.select_scaling(base, experts, "task_arithmetic", evaluate, scaling=0.3)
    with pytest.raises(ConfigError, match="grid' or 'golden"):
        mk.merging.select_scaling(base, experts, "task_arithmetic", evaluate, search="random")
