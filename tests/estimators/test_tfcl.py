"""TFCL (a reconstruction): block recovery (D6), the Ky Fan linearisation, the eigenvalue sum's
zero set, and the plain Laplacian's isolated-node failure that the normalised default avoids."""

from __future__ import annotations

import numpy as np
import pytest

from mtlkit.estimators import TFCL, block_task_problem
from mtlkit.estimators.tfcl import bipartite_laplacian, spectral_costs


def _off_block(coef, mask):
    mass = np.abs(coef.T)
    return mass[~mask].sum() / mass.sum()


@pytest.mark.parametrize("seed", range(5))
def test_d6_two_feature_task_blocks_are_recovered(seed):
    x, y, weights, mask = block_task_problem(seed=seed)
    model = TFCL(n_blocks=2).fit(x, y)
    assert _off_block(model.coef_, mask) < 0.05
    # gamma 10 (the default) leaves 2% of the mass across on seed 2, in one component; 20 cuts it
    blocks = sorted((t.tolist(), f.tolist()) for f, t in TFCL(n_blocks=2, gamma=20.0).fit(x, y).blocks_)
    assert [tasks for tasks, _ in blocks] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # no task sharing across
    placed = len(set(blocks[0][1]) & set(range(10))) + len(set(blocks[1][1]) & set(range(10, 20)))
    assert placed >= 17  # features in their true block (a weak one may sit with the other tasks)
    ridge = TFCL(n_blocks=2, gamma=0.0).fit(x, y)  # the start: no structure
    assert _off_block(ridge.coef_, mask) > 0.15
    assert np.abs(model.coef_.T - weights).mean() < np.abs(ridge.coef_.T - weights).mean()


def test_the_plain_laplacian_detaches_a_node_instead_of_cutting_between_the_groups():
    x, y, _, mask = block_task_problem(seed=0)
    plain = TFCL(n_blocks=2, normalized=False).fit(x, y)
    assert _off_block(plain.coef_, mask) > 0.15
    sizes = sorted(len(f) + len(t) for f, t in plain.blocks_)
    assert len(plain.blocks_) == 1 and sizes[0] < 26  # one component with a task; a feature left alone


def test_with_the_eigenvectors_fixed_the_regulariser_is_a_weighted_l1_norm():
    rng = np.random.default_rng(0)
    weights = np.abs(rng.standard_normal((7, 4)))
    costs, eigen_sum = spectral_costs(weights, 3, normalized=False)
    values, vectors = np.linalg.eigh(bipartite_laplacian(weights))
    u = vectors[:, :3]
    assert np.trace(u.T @ bipartite_laplacian(weights) @ u) == pytest.approx(
        (costs * weights).sum(), rel=1e-12
    )
    assert eigen_sum == pytest.approx(values[:3].sum(), rel=1e-12)
    # Ky Fan: any other orthonormal U gives at least the eigenvalue sum
    q, _ = np.linalg.qr(rng.standard_normal((11, 3)))
    assert np.trace(q.T @ bipartite_laplacian(weights) @ q) >= eigen_sum - 1e-12


@pytest.mark.parametrize("normalized", [True, False])
def test_the_eigenvalue_sum_vanishes_exactly_with_enough_components(normalized):
    blocks = np.zeros((6, 4))
    blocks[:3, :2] = 1.0 + np.arange(6).reshape(3, 2)
    blocks[3:, 2:] = 2.0
    assert spectral_costs(blocks, 2, normalized)[1] == pytest.approx(0.0, abs=1e-12)
    blocks[0, 3] = 0.5  # one edge across
    assert spectral_costs(blocks, 2, normalized)[1] > 1e-3


def test_bad_settings_are_refused():
    x, y, _, _ = block_task_problem(seed=0)
    with pytest.raises(ValueError, match="n_blocks"):
        TFCL(n_blocks=0).fit(x, y)
    with pytest.raises(ValueError, match="exceeds"):
        TFCL(n_blocks=50).fit(x, y)


@pytest.mark.parametrize("seed", range(3))
def test_a_constant_feature_does_not_count_as_a_block(seed):
    x, y, _, mask = block_task_problem(seed=seed)
    with_constant = np.column_stack([x[:, :-1], np.ones(len(x)), x[:, -1]])  # centred away: a zero row
    model = TFCL(n_blocks=2).fit(with_constant, y)
    assert _off_block(np.delete(model.coef_, 20, axis=1), mask) < 0.05
    assert np.all(model.coef_[:, 20] == 0)
