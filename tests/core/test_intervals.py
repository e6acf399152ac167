"""ANT's interval clustering: the spec's plateau test, brute force over all splits, the affinity
cost, and bad inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlkit.core.intervals import affinity_cost, cluster_intervals, snr_cost, uniform_intervals
from mtlkit.errors import ConfigError


def test_snr_plateaus_are_recovered_exactly_with_zero_cost():
    snr = np.concatenate([np.full(300, 10.0), np.full(400, 1.0), np.full(300, 0.1)])
    intervals, cost = cluster_intervals(snr_cost(snr), 3)
    assert intervals == [(0, 299), (300, 699), (700, 999)]
    assert cost == 0.0
    assert uniform_intervals(1000, 3) != intervals  # an equal split fails this test


def brute_force(cost, k):
    t = cost.shape[0]
    best = (np.inf, None)
    for cuts in itertools.combinations(range(1, t), k - 1):
        edges = [0, *cuts, t]
        total = sum(cost[edges[i], edges[i + 1] - 1] for i in range(k))
        best = min(best, (total, cuts), key=lambda b: b[0])
    return best[0]


@given(st.integers(0, 10_000), st.integers(1, 4), st.booleans())
@settings(max_examples=40, deadline=None)
def test_the_dynamic_programme_matches_brute_force(seed, k, monotone):
    rng = np.random.default_rng(seed)
    snr = rng.gamma(1.0, size=30)
    if monotone:
        snr = np.sort(snr)[::-1]
    intervals, cost = cluster_intervals(snr_cost(snr), k)
    assert cost == pytest.approx(brute_force(snr_cost(snr), k), abs=1e-9)
    assert len(intervals) == k and intervals[0][0] == 0 and intervals[-1][1] == 29
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(intervals))


def test_the_monotone_prefix_sums_equal_the_direct_sums():
    snr = np.sort(np.random.default_rng(0).gamma(1.0, size=40))[::-1]
    fast = snr_cost(snr)
    for lo in range(40):
        for hi in range(lo, 40):
            centre = (lo + hi + 1) // 2
            assert fast[lo, hi] == pytest.approx(np.abs(snr[lo : hi + 1] - snr[centre]).sum(), abs=1e-9)


def test_affinity_cost_groups_blocks_of_agreeing_timesteps():
    a = np.full((20, 20), -0.5)
    for lo, hi in ((0, 7), (8, 19)):
        a[lo : hi + 1, lo : hi + 1] = 1.0
    intervals, cost = cluster_intervals(affinity_cost(a), 2)
    assert intervals == [(0, 7), (8, 19)]
    assert cost == -(8 + 12)


def test_uniform_intervals_and_bad_inputs():
    assert uniform_intervals(1000, 5) == [(0, 199), (200, 399), (400, 599), (600, 799), (800, 999)]
    with pytest.raises(ConfigError, match="k must be"):
        cluster_intervals(snr_cost(np.ones(5)), 6)
    with pytest.raises(ConfigError, match="square"):
        affinity_cost(np.ones((3, 4)))
