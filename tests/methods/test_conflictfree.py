"""ConFIG: equal angles, the two-task bisector, the Gramian-only form against the official J form."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.methods.conflictfree import ConFIG, conflictfree_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad

TRACKED = {
    "track_min": np.min,
    "track_max": np.max,
    "track_arithmetic": np.mean,
    "track_harmonic": lambda n: len(n) / np.sum(1 / n),
    "track_geometric": lambda n: np.prod(n) ** (1 / len(n)),
}


def reference(J, p=None, length="projection"):
    """The official algorithm on the gradients themselves (numpy): minimum-norm least squares of
    U x = p, then the length model."""
    J = np.asarray(J, dtype=np.float64)
    p = np.ones(len(J)) if p is None else np.asarray(p, dtype=np.float64)
    norms = np.linalg.norm(J, axis=1)
    with np.errstate(invalid="ignore"):
        U = np.nan_to_num(J / norms[:, None])  # a zero gradient: a zero row
    x = np.linalg.lstsq(U, p, rcond=None)[0]
    unit = x / np.linalg.norm(x)
    size = np.sum(J @ unit) if length == "projection" else TRACKED[length](norms) * np.sum(U @ unit)
    return torch.from_numpy(size * unit)


def direction(J, p=None, length="projection"):
    w, _, _ = conflictfree_weights(J @ J.T, torch.ones(len(J)) if p is None else torch.tensor(p), length)
    return J.T @ w


def cosines(J, d):
    return (J @ d) / (J.norm(dim=1) * d.norm())


@pytest.mark.parametrize(("k", "d"), [(2, 3), (4, 4), (4, 30), (10, 40)])
def test_every_task_gradient_makes_the_same_positive_angle(k, d):
    J = torch.randn(k, d, dtype=torch.float64) * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    out = direction(J)
    cos = cosines(J, out)
    torch.testing.assert_close(cos, cos.mean().expand(k), atol=1e-10, rtol=0)
    assert (cos > 0).all()
    torch.testing.assert_close(out, reference(J), atol=1e-9 * out.norm().item(), rtol=0)


def test_two_tasks_follow_the_bisector_with_the_projection_length():
    g1 = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    theta = 2.0
    g2 = 0.7 * torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
    out = direction(torch.stack([g1, g2]))
    bisector = g1 / g1.norm() + g2 / g2.norm()
    torch.testing.assert_close(out / out.norm(), bisector / bisector.norm(), atol=1e-14, rtol=0)
    assert out.norm().item() == pytest.approx((2.0 + 0.7) * math.cos(theta / 2), rel=1e-13)


@pytest.mark.parametrize("length", ["projection", *TRACKED])
def test_gramian_form_reproduces_the_official_direction(length):
    J = (
        torch.randn(5, 12, dtype=torch.float64)
        * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0], dtype=torch.float64)[:, None]
    )
    p = [1.0, 2.0, 0.5, 1.0, 3.0]
    out = direction(J, p, length)
    torch.testing.assert_close(out, reference(J, p, length), atol=1e-10 * out.norm().item(), rtol=0)
    unit = torch.nn.functional.normalize(J, dim=1)
    proj = unit @ out / out.norm()
    torch.testing.assert_close(proj / proj[0], torch.tensor(p, dtype=torch.float64) / p[0])  # <u_k, x> = p_k


def test_more_tasks_than_rank_is_the_least_squares_direction_and_reports_the_worst_angle():
    J = torch.randn(4, 3, dtype=torch.float64)
    w, min_cos, degenerate = conflictfree_weights(J @ J.T, torch.ones(4))
    out = J.T @ w
    torch.testing.assert_close(out, reference(J), atol=1e-9 * out.norm().item(), rtol=0)
    assert not degenerate
    assert min_cos.item() == pytest.approx(cosines(J, out).min().item(), abs=1e-12)
    J[3] = J[0] + J[1]  # dependent directions
    torch.testing.assert_close(direction(J), reference(J), atol=1e-9, rtol=1e-9)


def test_opposite_gradients_give_no_update_and_no_nan():
    g = torch.randn(6, dtype=torch.float64)
    for J in (torch.stack([g, -g]), torch.stack([g, -3 * g])):
        w, min_cos, degenerate = conflictfree_weights(J @ J.T, torch.ones(2))
        assert degenerate and torch.equal(w, torch.zeros(2, dtype=torch.float64)) and min_cos == 0
    # an opposite pair beside an orthogonal task: the pair cancels, the third task goes ahead
    h = torch.randn(6, dtype=torch.float64)
    h = h - (h @ g) / (g @ g) * g
    J = torch.stack([g, -2 * g, h])
    w, _, degenerate = conflictfree_weights(J @ J.T, torch.ones(3))
    assert not degenerate
    torch.testing.assert_close(J.T @ w, h, atol=1e-12, rtol=0)


def test_one_task_zero_gradients_and_scales():
    g = torch.randn(1, 5, dtype=torch.float64)
    torch.testing.assert_close(direction(g), g[0], atol=1e-14, rtol=0)
    w, _, degenerate = conflictfree_weights(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1))
    assert w.tolist() == [0.0] and degenerate
    J = torch.randn(3, 7, dtype=torch.float64)
    J[1] = 0  # a zero gradient: a zero unit row, as in the official code
    torch.testing.assert_close(direction(J), reference(J), atol=1e-12, rtol=1e-12)
    for s in (1e-8, 1e8):
        torch.testing.assert_close(direction(s * J), s * direction(J), atol=0, rtol=1e-10)


@given(
    k=st.integers(1, 6),
    extra=st.integers(0, 5),
    seed=st.integers(0, 10_000),
    log_scales=st.lists(st.floats(-8, 8), min_size=6, max_size=6),
)
@settings(max_examples=50, deadline=None)
def test_direction_ignores_gradient_norms_and_task_order(k, extra, seed, log_scales):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, k + extra, generator=gen, dtype=torch.float64)
    assume(torch.linalg.svdvals(torch.nn.functional.normalize(J, dim=1)).min() > 1e-4)
    c = 10.0 ** torch.tensor(log_scales[:k], dtype=torch.float64)
    out, scaled = direction(J), direction(c[:, None] * J)
    torch.testing.assert_close(scaled / scaled.norm(), out / out.norm(), atol=1e-9, rtol=0)
    cos = cosines(c[:, None] * J, scaled)
    torch.testing.assert_close(cos, cos.mean().expand(k), atol=1e-9, rtol=0)
    perm = torch.randperm(k, generator=gen)
    torch.testing.assert_close(direction(J[perm]), out, atol=1e-9 * out.norm().item(), rtol=0)


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_backward_writes_the_conflict_free_direction_and_heads_get_their_own(level):
    tasks, net, x, y = make_problem(k=3)
    J, heads, H = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    info = ConFIG(level=level).backward(tasks.losses(out.predictions, y), net, out)
    if level == "parameter":
        torch.testing.assert_close(shared_grad(net), reference(J), atol=1e-10, rtol=1e-9)
        assert info.extras["min_cosine"].item() == pytest.approx(cosines(J, shared_grad(net)).min().item())
    else:  # the direction is chosen among the representation gradients, then pulled back
        w, _, _ = conflictfree_weights(H @ H.T, torch.ones(3))
        torch.testing.assert_close(shared_grad(net), J.T @ w, atol=1e-10, rtol=1e-9)
    assert not info.extras["degenerate"]
    for k, t in enumerate(tasks.names):
        for p, g in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=0)


def test_registry_name_preferences_and_missing_labels():
    assert isinstance(mk.methods.create("conflictfree"), ConFIG)
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    with pytest.raises(mk.errors.ConfigError, match="preferences"):
        ConFIG(pref=[1.0, 2.0]).setup(tasks)
    y["t1"] = torch.full_like(y["t1"], float("nan"))
    info = ConFIG(pref=[1.0, 5.0, 2.0]).backward(tasks.losses(net(x), y), net)
    assert info.weights[1] == 0
    torch.testing.assert_close(shared_grad(net), reference(J[[0, 2]], [1.0, 2.0]), atol=1e-10, rtol=1e-9)
