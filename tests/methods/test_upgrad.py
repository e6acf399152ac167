"""UPGrad: non-conflicting, exact, the mean when nothing conflicts, half of PCGrad at K = 2."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls

import mtlkit as mk
from mtlkit.methods.dual_cone import project_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def upgrad_weights(J, pref=None):
    method = mk.methods.UPGrad(pref=pref)
    method.setup([f"t{i}" for i in range(len(J))])
    method.active_index = None
    return method.weights(J @ J.T, torch.ones(len(J), dtype=torch.float64))


@given(
    k=st.integers(1, 7),
    d=st.integers(1, 9),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_upgrad_never_conflicts_and_matches_an_independent_nnls(k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, generator=gen, dtype=torch.float64)
    w = upgrad_weights(J)
    direction = J.T @ w
    scale = float((J * J).sum(1).max())
    assert (J @ direction >= -1e-9 * scale).all()  # no task's loss increases to first order
    assert (w >= 1.0 / k - 1e-12).all()  # w >= p
    # each projection pi(g_i) = J^T v_i with v_i = p_i e_i + argmin_{mu >= 0} ||J^T (p_i e_i + mu)||
    ref = np.zeros(k)
    for i in range(k):
        b = np.zeros(k)
        b[i] = 1.0 / k
        mu, _ = nnls(J.T.numpy(), -(J.T.numpy() @ b))
        ref += b + mu
    torch.testing.assert_close(direction, J.T @ torch.from_numpy(ref), atol=1e-8 * scale**0.5, rtol=0)


def test_upgrad_is_the_mean_when_no_gradients_conflict():
    J = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.3, 0.4, 1.0]], dtype=torch.float64)
    assert (J @ J.T >= 0).all()
    torch.testing.assert_close(upgrad_weights(J), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_upgrad_is_half_of_pcgrad_for_two_conflicting_tasks():
    g1 = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    g2 = torch.tensor([-0.8, 1.0, 0.0], dtype=torch.float64)
    assert g1 @ g2 < 0
    pc1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    pc2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    J = torch.stack([g1, g2])
    torch.testing.assert_close(J.T @ upgrad_weights(J), 0.5 * (pc1 + pc2), atol=1e-12, rtol=0)


def test_upgrad_preference_and_rank_deficient_inputs():
    g = torch.tensor([1.0, -1.0], dtype=torch.float64)
    J = torch.stack([g, g, -g, torch.zeros(2, dtype=torch.float64)])  # duplicated, opposite, zero
    w = upgrad_weights(J, pref=[0.1, 0.2, 0.3, 0.4])
    assert (J @ (J.T @ w)).abs().max() < 1e-12  # opposite tasks: the only non-conflicting step is 0
    assert (w >= torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) - 1e-12).all()


def test_project_weights_is_scale_free():
    J = torch.randn(5, 3, dtype=torch.float64)
    b = torch.diag(torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(project_weights(J @ J.T, b)[0], project_weights(1e-12 * J @ J.T, b)[0])


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_upgrad_at_both_levels_does_not_conflict_with_any_task(level):
    tasks, net, x, y = make_problem(k=4)
    J, _, H = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    info = mk.methods.UPGrad(level=level).backward(tasks.losses(out.predictions, y), net, out)
    G = J @ J.T if level == "parameter" else H @ H.T
    w = info.weights
    assert (G @ w >= -1e-10 * G.diagonal().max()).all()  # non-conflict where the Gramian was taken
    torch.testing.assert_close(shared_grad(net), J.T @ w, atol=1e-10, rtol=0)
    if level == "parameter":
        assert (J @ shared_grad(net) >= -1e-10).all()


def test_upgrad_official_regularisation_is_available():
    J = torch.randn(4, 2, dtype=torch.float64)
    method = mk.methods.UPGrad(reg_eps=1e-4)
    method.setup(["a", "b", "c", "d"])
    w = method.weights(J @ J.T, torch.ones(4, dtype=torch.float64))
    assert (w >= 0.25 - 1e-12).all()
