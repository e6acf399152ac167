"""Nash-MTL and FairGrad: the bargaining / alpha-fair equation holds to round-off; orthogonal
closed forms; invariance to per-task gradient scaling; degenerate Gramians stay finite."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import least_squares

import mtlkit as mk
from mtlkit.methods.alpha_fair import alpha_fair_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def solve(name, J, **options):
    method = mk.methods.create(name, **options)
    method.setup([f"t{i}" for i in range(len(J))])
    return method.weights(J @ J.T, torch.ones(len(J), dtype=torch.float64))


def random_jacobian(k, d, seed, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, generator=gen, dtype=torch.float64)
    return J * torch.exp(spread * torch.rand(k, 1, generator=gen, dtype=torch.float64))


@given(
    k=st.integers(1, 30),
    seed=st.integers(0, 10_000),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
    log_scale=st.integers(-8, 8),
)
@settings(max_examples=80, deadline=None)
def test_the_alpha_fair_equation_holds_componentwise(k, seed, alpha, log_scale):
    J = random_jacobian(k, k + 5, seed) * 10.0**log_scale  # full row rank
    G = J @ J.T
    w, residual = alpha_fair_weights(G, alpha)
    assert (w > 0).all() and residual < 1e-10
    target = w.pow(-1 / alpha)
    torch.testing.assert_close(G @ w, target, rtol=1e-8, atol=0)


def test_nash_mtl_is_the_bargaining_solution_up_to_k100():
    J = random_jacobian(100, 150, 0)
    alpha = solve("nash_mtl", J)
    torch.testing.assert_close(
        alpha * (J @ J.T @ alpha), torch.ones(100, dtype=torch.float64), rtol=1e-8, atol=0
    )


def test_orthogonal_tasks_have_the_closed_forms():
    norms = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    J = torch.diag(norms)
    torch.testing.assert_close(solve("nash_mtl", J), 1 / norms)
    d = J.T @ solve("nash_mtl", J)
    torch.testing.assert_close(d, torch.ones(3, dtype=torch.float64))  # the sum of unit vectors
    for alpha in (0.5, 2.0):
        w = solve("fairgrad", J, alpha=alpha, scale=1.0)
        torch.testing.assert_close(w, norms.pow(-2 * alpha / (alpha + 1)))


@given(seed=st.integers(0, 10_000), k=st.integers(2, 6))
@settings(max_examples=30, deadline=None)
def test_the_nash_direction_is_invariant_to_per_task_gradient_scaling(seed, k):
    J = random_jacobian(k, 8, seed)
    c = torch.exp(torch.randn(k, 1, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64))
    d1 = J.T @ solve("nash_mtl", J)
    d2 = (c * J).T @ solve("nash_mtl", c * J)
    torch.testing.assert_close(d1, d2, rtol=1e-8, atol=1e-12)


def test_mgda_is_not_invariant_to_per_task_gradient_scaling():
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    for name, invariant in (("nash_mtl", True), ("mgda", False)):
        d1, d2 = J.T @ solve(name, J), (c * J).T @ solve(name, c * J)
        assert torch.allclose(d1 / d1.norm(), d2 / d2.norm()) == invariant


def test_fairgrad_with_alpha_one_is_nash_mtl_and_agrees_with_least_squares():
    J = random_jacobian(5, 9, 3)
    torch.testing.assert_close(solve("fairgrad", J, alpha=1.0, scale=1.0), solve("nash_mtl", J))
    G = (J @ J.T).numpy()
    for alpha in (0.5, 2.0):
        ref = least_squares(
            lambda w, a=alpha: G @ w - w ** (-1 / a),
            np.full(5, 0.2),
            bounds=(1e-9, np.inf),
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
        ).x
        np.testing.assert_allclose(solve("fairgrad", J, alpha=alpha, scale=1.0).numpy(), ref, rtol=1e-6)


def test_official_scale_and_one_task():
    J = random_jacobian(4, 9, 5)
    torch.testing.assert_close(solve("fairgrad", J), 4 * solve("fairgrad", J, scale=1.0))
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(solve("nash_mtl", g), torch.tensor([0.2], dtype=torch.float64))
    torch.testing.assert_close(
        solve("fairgrad", g, alpha=2.0, scale=1.0), torch.tensor([5.0 ** (-4 / 3)], dtype=torch.float64)
    )


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_degenerate_gramians_give_finite_weights(name):
    g = torch.tensor([1.0, 0.5], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    w = solve(name, torch.stack([g, zero, 2 * g]))  # a zero gradient gets weight 0
    assert torch.isfinite(w).all() and w[1] == 0 and (w[[0, 2]] > 0).all()
    w = solve(name, torch.stack([g, -g]))  # no fixed point: finite, and the direction is 0
    assert torch.isfinite(w).all()
    assert (torch.stack([g, -g]).T @ w).abs().max() < 1e-6 * float(w.abs().max())
    assert (solve(name, torch.zeros(3, 2, dtype=torch.float64)) == 0).all()
    w = solve(name, torch.stack([g, g]))  # duplicates share equally
    torch.testing.assert_close(w[0], w[1])


def test_end_to_end_weighted_heads_and_clipped_shared_gradient():
    tasks, net, x, y = make_problem(k=3)
    J, heads, _ = brute_force(net, tasks, x, y)
    info = mk.methods.create("nash_mtl").backward(tasks.losses(net(x), y), net)
    alpha = solve("nash_mtl", J)
    d = J.T @ alpha
    expected = d * min(1.0, 1.0 / (float(d.norm()) + 1e-6))
    torch.testing.assert_close(shared_grad(net), expected, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(info.weights, alpha, rtol=1e-8, atol=0)
    assert info.extras["residual"] < 1e-10
    for k, t in enumerate(tasks.names):
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, alpha[k] * ref, atol=1e-10, rtol=1e-8)


def test_update_every_reuses_the_weights_with_one_backward():
    tasks, net, x, y = make_problem(k=3)
    method = mk.methods.create("nash_mtl", update_every=3, max_norm=None)
    first = method.backward(tasks.losses(net(x), y), net)
    J, heads, _ = brute_force(net, tasks, x, y)
    net.zero_grad()
    second = method.backward(tasks.losses(net(x), y), net)
    assert second.extras.get("reused_weights") and second.gramian is None
    torch.testing.assert_close(second.weights, first.weights)
    torch.testing.assert_close(shared_grad(net), J.T @ first.weights, atol=1e-10, rtol=1e-8)
    for k, t in enumerate(tasks.names):  # heads: the weighted gradient, as on a solve step
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, first.weights[k] * ref, atol=1e-10, rtol=1e-8)
    net.zero_grad()
    method.backward(tasks.losses(net(x), y), net)
    third = method.backward(tasks.losses(net(x), y), net)  # step 4: a new solve
    assert "reused_weights" not in third.extras and third.gramian is not None


def test_update_every_with_own_heads_and_clipping():
    tasks, net, x, y = make_problem(k=3)
    method = mk.methods.create("fairgrad", update_every=2, max_norm=0.05)
    first = method.backward(tasks.losses(net(x), y), net)
    J, heads, _ = brute_force(net, tasks, x, y)
    net.zero_grad()
    method.backward(tasks.losses(net(x), y), net)
    d = J.T @ first.weights
    torch.testing.assert_close(
        shared_grad(net), d * min(1.0, 0.05 / (float(d.norm()) + 1e-6)), atol=1e-10, rtol=1e-8
    )
    for k, t in enumerate(tasks.names):
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, ref, atol=1e-10, rtol=1e-8)
