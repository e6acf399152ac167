"""The min-norm solver meets the KKT conditions and agrees with reference QP solvers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlkit.methods.min_norm import kkt_violation, min_norm_weights


def reference_qp(gram: np.ndarray) -> np.ndarray:
    qpsolvers = pytest.importorskip("qpsolvers")
    k = gram.shape[0]
    return qpsolvers.solve_qp(
        P=2 * gram + 1e-13 * np.eye(k),
        q=np.zeros(k),
        A=np.ones((1, k)),
        b=np.ones(1),
        lb=np.zeros(k),
        ub=np.ones(k),
        solver="quadprog",
    )


@settings(max_examples=100, deadline=None)
@given(k=st.integers(2, 12), d=st.integers(1, 30), seed=st.integers(0, 10_000), conflict=st.booleans())
def test_kkt_conditions_and_reference_qp(k, d, seed, conflict):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, dtype=torch.float64, generator=gen)
    if conflict:
        J[1] = -J[0]
    G = J @ J.T
    w = min_norm_weights(G)
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-12
    assert kkt_violation(G, w) < 1e-9
    m = (w @ G @ w).item()
    gw = G @ w
    assert (gw >= m - 1e-9 * G.diagonal().max()).all()  # every task: (G w)_k >= m
    # Reference: the min-norm value and the direction J^T w are unique even when w is not.
    w_ref = torch.from_numpy(reference_qp(G.numpy()))
    d_ref = J.T @ w_ref
    scale = G.diagonal().max().sqrt().item()
    assert abs(m - (w_ref @ G @ w_ref).item()) < 1e-6 * scale**2
    torch.testing.assert_close(J.T @ w, d_ref, atol=1e-6 * scale, rtol=0)


def test_matches_cvxpy_weights_for_positive_definite_gramians():
    cp = pytest.importorskip("cvxpy")
    gen = torch.Generator().manual_seed(3)
    for k in (3, 5, 10):
        J = torch.randn(k, 40, dtype=torch.float64, generator=gen)
        J[: k // 2] -= 2 * J[k // 2 :][: k // 2].mean(0)  # create conflicts so the optimum is interior-ish
        G = (J @ J.T).numpy()
        x = cp.Variable(k)
        cp.Problem(cp.Minimize(cp.quad_form(x, cp.psd_wrap(G))), [x >= 0, cp.sum(x) == 1]).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12
        )
        w = min_norm_weights(torch.from_numpy(G))
        np.testing.assert_allclose(w.numpy(), x.value, atol=1e-6)


def test_opposite_gradients_cancel_exactly():
    g = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    J = torch.stack([g, -g])
    w = min_norm_weights(J @ J.T)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.count_nonzero(J.T @ w) == 0


def test_dominated_pair_returns_the_smaller_gradient_exactly():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([3.0, 0.5], dtype=torch.float64)  # <g1, g2> >= ||g1||^2
    J = torch.stack([g1, g2])
    w = min_norm_weights(J @ J.T)
    assert w.tolist() == [1.0, 0.0]  # the official 0.999/0.001 clamp is not reproduced


def test_one_task_inactive_tasks_and_zero_gradients():
    assert min_norm_weights(torch.eye(1, dtype=torch.float64) * 3).tolist() == [1.0]
    G = torch.tensor([[1.0, 0.2, 0.0], [0.2, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    w = min_norm_weights(G, active=torch.tensor([True, True, False]))
    assert w[2] == 0 and abs(w.sum() - 1) < 1e-12 and kkt_violation(G[:2, :2], w[:2]) < 1e-12
    assert min_norm_weights(torch.zeros(3, 3, dtype=torch.float64)).tolist() == pytest.approx([1 / 3] * 3)
    assert min_norm_weights(G, active=torch.zeros(3, dtype=torch.bool)).tolist() == [0, 0, 0]


@pytest.mark.parametrize(("k", "d", "seed"), [(12, 7, 882), (40, 3, 0), (30, 29, 1), (20, 1, 5)])
def test_rank_deficient_gramians_are_solved_exactly(k, d, seed):
    """More tasks than dimensions: the support's KKT systems stay non-singular (Wolfe's corrals)."""
    J = torch.randn(k, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    G = J @ J.T
    w = min_norm_weights(G)
    assert kkt_violation(G, w) < 1e-10
    assert (w > 0).sum() <= d + 1  # Carathéodory: an affinely independent support


def test_warm_start_from_any_point_gives_the_same_optimum():
    J = torch.randn(15, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    G = J @ J.T
    cold = min_norm_weights(G)
    for init in (torch.full((15,), 1 / 15, dtype=torch.float64), cold, torch.eye(15, dtype=torch.float64)[3]):
        warm = min_norm_weights(G, init=init)
        torch.testing.assert_close(J.T @ warm, J.T @ cold, atol=1e-12, rtol=0)
