"""DualProj: KKT conditions, closest non-conflicting vector, the mean when nothing conflicts."""

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls

import mtlkit as mk
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def dualproj_weights(J, **options):
    method = mk.methods.create("dualproj", **options)
    method.setup([f"t{i}" for i in range(len(J))])
    return method.weights(J @ J.T, torch.ones(len(J), dtype=torch.float64))


@given(k=st.integers(1, 12), d=st.integers(1, 10), seed=st.integers(0, 10_000), log_scale=st.integers(-8, 8))
@example(k=9, d=5, seed=2260, log_scale=0)  # d = 0 with weights near 2000: the tolerance must scale
@settings(max_examples=80, deadline=None)
def test_kkt_conditions_and_agreement_with_nnls(k, d, seed, log_scale):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, generator=gen, dtype=torch.float64) * 10.0**log_scale
    w = dualproj_weights(J)
    p = torch.full((k,), 1.0 / k, dtype=torch.float64)
    G = J @ J.T
    gw = G @ w
    top = float(G.diagonal().max())
    assert (w >= p - 1e-12).all()
    assert (gw >= -1e-9 * top).all()  # no task conflicts with the direction
    # complementarity; its round-off grows with the weights: with K > d the dual cone is often {0},
    # every w >= p with J^T w = 0 is optimal, and the exact solve on the free set may pick large ones
    assert ((w - p) * gw).abs().max() <= 1e-9 * top * max(1.0, float(w.abs().max()))
    mu, _ = nnls(J.T.numpy(), -(J.T.numpy() @ p.numpy()), maxiter=10_000)
    ref = J.T @ (p + torch.from_numpy(mu))
    torch.testing.assert_close(J.T @ w, ref, atol=1e-8 * top**0.5, rtol=0)


def test_the_mean_when_nothing_conflicts_and_the_closest_feasible_point():
    J = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.3, 0.4, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(dualproj_weights(J), torch.full((3,), 1 / 3, dtype=torch.float64))
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    d = J.T @ dualproj_weights(J)
    mean = J.T.mean(1)
    for _ in range(200):  # random non-conflicting vectors are never closer to the mean
        y = J.T @ (torch.rand(5, generator=gen, dtype=torch.float64) * 3)
        y = y + 0.0
        if (J @ y >= 0).all():
            assert (d - mean).norm() <= (y - mean).norm() + 1e-12


def test_degenerate_inputs_stay_finite():
    g = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for J in (
        torch.stack([g, -g]),  # opposite: the only non-conflicting direction is 0
        torch.stack([g, g, torch.zeros(2, dtype=torch.float64)]),  # duplicate and zero
        torch.zeros(3, 2, dtype=torch.float64),
        g[None],
    ):
        w = dualproj_weights(J)
        assert torch.isfinite(w).all()
        assert (J @ (J.T @ w) >= -1e-12).all()
    torch.testing.assert_close(dualproj_weights(g[None]), torch.ones(1, dtype=torch.float64))


def test_k100_is_exact_and_warm_start_gives_the_same_answer():
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(100, 60, generator=gen, dtype=torch.float64)
    method = mk.methods.create("dualproj")
    method.setup([f"t{i}" for i in range(100)])
    ones = torch.ones(100, dtype=torch.float64)
    w1 = method.weights(J @ J.T, ones)
    assert method.free_sets.any()
    w2 = method.weights(J @ J.T, ones)  # warm: starts from the optimal free set
    torch.testing.assert_close(w1, w2, atol=1e-13, rtol=0)
    assert (J @ J.T @ w1 >= -1e-9 * float((J * J).sum(1).max())).all()
    p = torch.full((100,), 0.01, dtype=torch.float64)
    mu, _ = nnls(J.T.numpy(), -(J.T.numpy() @ p.numpy()), maxiter=10_000)
    np.testing.assert_allclose((J.T @ w1).numpy(), J.T.numpy() @ (p.numpy() + mu), atol=1e-9)


def test_end_to_end_matches_the_projection_of_explicit_gradients():
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    mk.methods.create("dualproj").backward(tasks.losses(net(x), y), net)
    torch.testing.assert_close(shared_grad(net), J.T @ dualproj_weights(J), atol=1e-10, rtol=1e-8)


def test_problems_the_exchanges_leave_unsolved_are_finished_by_lawson_hanson():
    from mtlkit.methods.dual_cone import nonneg_qp_batched

    gen = torch.Generator().manual_seed(4)
    J = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    G = J @ J.T
    p = torch.full((9,), 1 / 9, dtype=torch.float64)
    mu, _ = nnls(J.T.numpy(), -(J.T.numpy() @ p.numpy()), maxiter=10_000)
    ref = J.T @ (p + torch.from_numpy(mu))
    for limit in (1, 2):  # too few exchanges to finish: the fallback must still give the optimum
        x, free = nonneg_qp_batched(G, (p @ G)[None], max_iter=limit)
        torch.testing.assert_close(J.T @ (p + x[0]), ref, atol=1e-10, rtol=0)
        assert (G @ (p + x[0]) >= -1e-10).all() and torch.equal(free[0], x[0] > 0)
