"""CAGrad: strong duality and the active ball constraint (exact), the mean at c = 0, MGDA as
c grows, agreement with a generic convex solver on the primal problem."""

import math

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.methods.cagrad import cagrad_dual_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def raw_direction_weights(J, c):
    """Weights of d_raw = g0 + c ||g0|| J^T w / ||J^T w|| (no rescale, no factor K)."""
    method = mk.methods.create("cagrad", c=c, rescale=0, scale=1.0)
    method.setup([f"t{i}" for i in range(len(J))])
    return method.weights(J @ J.T, torch.ones(len(J), dtype=torch.float64))


def random_jacobian(k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, generator=gen, dtype=torch.float64)
    return J * torch.exp(2 * torch.rand(k, 1, generator=gen, dtype=torch.float64))


@given(
    k=st.integers(2, 9),
    d=st.integers(2, 12),
    seed=st.integers(0, 10_000),
    c=st.sampled_from([0.1, 0.4, 0.9, 3.0]),
    log_scale=st.integers(-8, 8),
)
@settings(max_examples=80, deadline=None)
def test_strong_duality_and_the_active_ball_constraint(k, d, seed, c, log_scale):
    J = random_jacobian(k, d, seed) * 10.0**log_scale
    G = J @ J.T
    g0 = J.mean(0)
    w_final = raw_direction_weights(J, c)
    d_raw = J.T @ w_final
    radius = c * float(g0.norm())
    w, u = cagrad_dual_weights(G, c)
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
    if u > 1e-9 * float(G.diagonal().max()) ** 0.5:  # the ball constraint is active
        assert abs(float((d_raw - g0).norm()) - radius) <= 1e-9 * radius
        # strong duality: the primal value min_k <g_k, d> equals the dual objective at w
        dual = float(w @ G @ torch.full((k,), 1 / k, dtype=torch.float64)) + radius * u
        primal = float((G @ w_final).min())
        assert abs(primal - dual) <= 1e-9 * float(G.diagonal().max())


def test_agrees_with_a_generic_convex_solver_on_the_primal():
    for k, d, seed in [(3, 10, 0), (5, 20, 1), (12, 30, 2), (60, 80, 3)]:
        J = random_jacobian(k, d, seed)
        c = 0.4
        d_raw = (J.T @ raw_direction_weights(J, c)).numpy()
        g0 = J.mean(0).numpy()
        x = cp.Variable(d)
        problem = cp.Problem(cp.Maximize(cp.min(J.numpy() @ x)), [cp.norm(x - g0) <= c * np.linalg.norm(g0)])
        problem.solve(solver=cp.CLARABEL)
        assert float((J.numpy() @ d_raw).min()) >= problem.value - 1e-6 * abs(problem.value)
        # the solver is accurate to ~1e-8 in value, so ~1e-4 in the point
        np.testing.assert_allclose(d_raw, x.value, atol=1e-3 * np.linalg.norm(g0))


def test_c_zero_is_the_mean_in_every_rescale_mode():
    J = random_jacobian(4, 7, 5)
    for rescale in (0, 1, 2):
        method = mk.methods.create("cagrad", c=0.0, rescale=rescale, scale=1.0)
        method.setup(["a", "b", "c", "d"])
        w = method.weights(J @ J.T, torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_large_c_approaches_the_mgda_direction():
    J = random_jacobian(5, 8, 7)
    d = J.T @ raw_direction_weights(J, 1e4)
    mgda = J.T @ mk.methods.min_norm_weights(J @ J.T)
    torch.testing.assert_close(d / d.norm(), mgda / mgda.norm(), atol=1e-3, rtol=0)


def test_official_scale_rescale_and_one_task():
    J = random_jacobian(3, 6, 9)
    method = mk.methods.create("cagrad")
    method.setup(["a", "b", "c"])
    official = method.weights(J @ J.T, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(official, 3 * raw_direction_weights(J, 0.4) / (1 + 0.4**2))
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(raw_direction_weights(g, 0.4), torch.tensor([1.4], dtype=torch.float64))
    method = mk.methods.create("cagrad", rescale=2, scale=1.0)
    method.setup(["a"])
    torch.testing.assert_close(method.weights(g @ g.T, torch.ones(1)), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize(
    "J",
    [
        torch.tensor([[1.0, 0.5], [-1.0, -0.5]]),  # opposite: g0 = 0, d = 0
        torch.tensor([[1.0, 0.5], [1.0, 0.5], [0.0, 0.0]]),  # duplicate and zero
        torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 0.0]]),  # zero vector in the hull
        torch.zeros(3, 2),
    ],
)
def test_degenerate_gramians_stay_finite(J):
    J = J.double()
    w = raw_direction_weights(J, 0.4)
    assert torch.isfinite(w).all()
    d = J.T @ w
    g0 = J.mean(0)
    assert float((d - g0).norm()) <= 0.4 * float(g0.norm()) * (1 + 1e-9) + 1e-15


def test_warm_start_gives_the_same_answer_up_to_k100():
    J = random_jacobian(100, 150, 4)
    method = mk.methods.create("cagrad")
    method.setup([f"t{i}" for i in range(100)])
    ones = torch.ones(100, dtype=torch.float64)
    method.active_index = torch.arange(100)
    first = method.weights(J @ J.T, ones)
    second = method.weights(J @ J.T, ones)
    torch.testing.assert_close(first, second, rtol=1e-10, atol=0)
    d = J.T @ first * (1 + 0.4**2) / 100
    g0 = J.mean(0)
    assert math.isclose(float((d - g0).norm()), 0.4 * float(g0.norm()), rel_tol=1e-9)


def test_end_to_end_heads_own_and_shared_official():
    tasks, net, x, y = make_problem(k=3)
    J, heads, _ = brute_force(net, tasks, x, y)
    mk.methods.create("cagrad").backward(tasks.losses(net(x), y), net)
    expected = 3 * (J.T @ raw_direction_weights(J, 0.4)) / (1 + 0.4**2)
    torch.testing.assert_close(shared_grad(net), expected, atol=1e-10, rtol=1e-8)
    for k, t in enumerate(tasks.names):
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, ref, atol=1e-12, rtol=0)


def test_zero_in_the_hull_with_a_large_radius_gives_the_primal_maximiser_zero():
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -0.2], [0.3, -1.0]], dtype=torch.float64)
    _, u = cagrad_dual_weights(J @ J.T, 3.0)
    assert u == 0.0  # 0 is in the interior of the hull: the dual optimum is J^T w = 0
    d = J.T @ raw_direction_weights(J, 3.0)
    assert float(d.abs().max()) == 0.0  # value min_k <g_k, 0> = 0: no other point does better


def test_zero_in_the_hull_with_a_small_radius_still_finds_the_root():
    # 0 is in the hull (K = 6 > d = 2), so next to t = 0 the root function is noise; c < 1 puts
    # the optimum at ||J^T w|| > 0 all the same (a hypothesis find: it used to raise in brentq)
    J = random_jacobian(6, 2, 34)
    G = J @ J.T
    w, u = cagrad_dual_weights(G, 0.4)
    g0 = J.mean(0)
    radius = 0.4 * float(g0.norm())
    assert u > 0
    d = J.T @ raw_direction_weights(J, 0.4)
    assert abs(float((d - g0).norm()) - radius) <= 1e-9 * radius
    dual = float(w @ G @ torch.full((6,), 1 / 6, dtype=torch.float64)) + radius * u
    assert abs(float((J @ d).min()) - dual) <= 1e-9 * float(G.diagonal().max())
