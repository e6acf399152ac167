"""Front metrics: exact hypervolumes, agreement with moocore, invariances, and clear errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlkit.errors import ConfigError
from mtlkit.metrics.pareto import dominates, hypervolume, igd, igd_plus, non_dominated, spacing

moocore = pytest.importorskip("moocore")


def test_hypervolume_of_known_fronts() -> None:
    assert hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0]) == pytest.approx(3.0)
    assert hypervolume([[0.0, 0.0, 0.0]], [1.0, 2.0, 3.0]) == pytest.approx(6.0)
    # boxes of volume 4 and 4 that overlap in a 1 x 1 x 2 slab: 4 + 4 - 2 = 8 - 2
    assert hypervolume([[0, 1, 0], [1, 0, 0]], [2, 2, 2]) == pytest.approx(2 * 2 * 2 - 1 * 1 * 2)


def test_points_beyond_the_reference_add_nothing() -> None:
    assert hypervolume([[4.0, 0.0]], [3.0, 3.0]) == 0.0
    assert hypervolume([[3.0, 1.0]], [3.0, 3.0]) == 0.0  # on the boundary: zero volume
    assert hypervolume([[1.0, 1.0], [5.0, 5.0]], [3.0, 3.0]) == pytest.approx(4.0)


def test_dominated_and_duplicate_points_change_nothing() -> None:
    front = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]
    base = hypervolume(front, [4.0, 4.0])
    assert hypervolume([*front, [2.5, 2.5], [2.0, 2.0]], [4.0, 4.0]) == pytest.approx(base)


def test_maximize_negates_columns() -> None:
    acc = [[0.9, 0.7], [0.8, 0.8]]
    assert hypervolume(acc, [0.0, 0.0], maximize=[True, True]) == pytest.approx(
        hypervolume([[-0.9, -0.7], [-0.8, -0.8]], [0.0, 0.0])
    )


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 5),
    n=st.integers(1, 25),
    seed=st.integers(0, 2**31 - 1),
    sphere=st.booleans(),
)
def test_hypervolume_agrees_with_moocore(m: int, n: int, seed: int, sphere: bool) -> None:
    rng = np.random.default_rng(seed)
    points = rng.random((n, m))
    if sphere:  # all mutually non-dominated: the hard case for the recursion
        points /= np.linalg.norm(points, axis=1, keepdims=True)
    ref = np.full(m, 1.1)
    assert hypervolume(points, ref) == pytest.approx(
        moocore.hypervolume(points, ref=ref), rel=1e-10, abs=1e-14
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 4))
def test_hypervolume_invariances(seed: int, m: int) -> None:
    rng = np.random.default_rng(seed)
    points, ref = rng.random((12, m)), np.full(m, 1.5)
    hv = hypervolume(points, ref)
    perm = rng.permutation(m)
    assert hypervolume(points[:, perm], ref[perm]) == pytest.approx(hv, rel=1e-12)  # objective order
    assert hypervolume(points[::-1], ref) == pytest.approx(hv, rel=1e-12)  # point order
    scale = rng.uniform(0.5, 2.0, m)
    assert hypervolume(points * scale, ref * scale) == pytest.approx(hv * scale.prod(), rel=1e-10)
    shift = rng.normal(size=m)
    assert hypervolume(points + shift, ref + shift) == pytest.approx(hv, rel=1e-10)
    better = points - 0.1  # moving every point forward only adds volume
    assert hypervolume(better, ref) > hv


def test_non_dominated_mask() -> None:
    front = np.array([[1.0, 3.0], [2.0, 2.0], [2.5, 2.5], [3.0, 1.0], [2.0, 2.0]])
    assert non_dominated(front).tolist() == [True, True, False, True, True]
    assert dominates([1, 1], [1, 2]) and not dominates([1, 1], [1, 1]) and not dominates([0, 2], [1, 1])
    for i, j in itertools.permutations(range(len(front)), 2):
        if dominates(front[i], front[j]):
            assert not non_dominated(front)[j]


def test_igd_and_igd_plus_agree_with_moocore() -> None:
    rng = np.random.default_rng(3)
    front, target = rng.random((20, 3)), rng.random((15, 3))
    assert igd(front, target) == pytest.approx(moocore.igd(front, ref=target), rel=1e-12)
    assert igd_plus(front, target) == pytest.approx(moocore.igd_plus(front, ref=target), rel=1e-12)
    assert igd(target, target) == 0.0
    assert igd_plus(target - 0.1, target) == 0.0  # a dominating front scores 0 on IGD+
    assert igd(target - 0.1, target) > 0.0  # ... but not on IGD


def test_spacing() -> None:
    even = [[0.0, 3.0], [1.0, 2.0], [2.0, 1.0], [3.0, 0.0]]
    assert spacing(even) == pytest.approx(0.0, abs=1e-12)
    assert spacing([[0.0, 3.0], [0.1, 2.9], [2.0, 1.0], [3.0, 0.0]]) > 0.1


@pytest.mark.parametrize(
    ("points", "reference"),
    [
        ([[1.0, float("nan")]], [2.0, 2.0]),
        ([[1.0, float("inf")]], [2.0, 2.0]),
        (np.zeros((0, 2)), [2.0, 2.0]),
        ([[1.0, 1.0]], [2.0]),
        ([[1.0, 1.0]], [2.0, float("nan")]),
    ],
)
def test_bad_input_is_a_clear_error(points: object, reference: object) -> None:
    with pytest.raises(ConfigError):
        hypervolume(points, reference)  # type: ignore[arg-type]


def test_shape_mismatch_and_too_few_points() -> None:
    with pytest.raises(ConfigError, match="objectives"):
        igd([[1.0, 2.0]], [[1.0, 2.0, 3.0]])
    with pytest.raises(ConfigError, match="two points"):
        spacing([[1.0, 2.0]])
    with pytest.raises(ConfigError, match="maximize"):
        hypervolume([[1.0, 2.0]], [3.0, 3.0], maximize=[True])
