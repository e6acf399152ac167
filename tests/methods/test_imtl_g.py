"""IMTL-G: impartial projections, the paper's closed form, scale equivariance, degenerate inputs."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.methods.imtl_g import IMTLG, impartial_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def form_a(J):
    """The paper's closed form (LibMTL / nash-mtl), in numpy: differences to the first task."""
    J = np.asarray(J, dtype=np.float64)
    U = J / np.linalg.norm(J, axis=1, keepdims=True)
    D, Ud = J[0] - J[1:], U[0] - U[1:]
    rest = J[0] @ Ud.T @ np.linalg.inv(D @ Ud.T)
    return torch.from_numpy(np.concatenate([[1 - rest.sum()], rest]))


def weights(J):
    return impartial_weights(J @ J.T)[0]


def projections(J, w):
    G = J @ J.T
    return (G @ w) / G.diagonal().sqrt()


@pytest.mark.parametrize(("k", "d"), [(2, 5), (4, 30), (7, 9), (100, 150)])
def test_every_unit_gradient_gets_the_same_projection_and_form_a_agrees(k, d):
    J = torch.randn(k, d, dtype=torch.float64)
    w = weights(J)
    proj = projections(J, w)
    assert abs(w.sum().item() - 1) < 1e-12
    torch.testing.assert_close(proj, proj.mean().expand(k), atol=0, rtol=1e-9)
    torch.testing.assert_close(w, form_a(J), atol=1e-8, rtol=1e-8)
    G = J @ J.T  # TorchJD's form: pinv(G) s, normalised; equal on full-rank gradients
    v = torch.linalg.pinv(G) @ G.diagonal().sqrt()
    torch.testing.assert_close(w, v / v.sum(), atol=1e-8, rtol=1e-8)


def test_two_orthogonal_tasks_get_inverse_norm_weights():
    a, b = 3.0, 0.5
    J = torch.tensor([[a, 0.0, 0.0], [0.0, b, 0.0]], dtype=torch.float64)
    w = weights(J)
    torch.testing.assert_close(w, torch.tensor([b, a], dtype=torch.float64) / (a + b), atol=1e-15, rtol=0)
    torch.testing.assert_close(projections(J, w), torch.full((2,), a * b / (a + b), dtype=torch.float64))


@given(
    k=st.integers(1, 6),
    extra=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    log_scales=st.lists(st.floats(-8, 8), min_size=6, max_size=6),
)
@settings(max_examples=60, deadline=None)
def test_direction_is_equivariant_to_per_task_gradient_scales(k, extra, seed, log_scales):
    """g_k -> c_k g_k leaves the impartial direction's line unchanged: d / (common projection)
    is J^T G^-1 s, which does not depend on the scales (across 16 orders of magnitude)."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, k + extra, generator=gen, dtype=torch.float64)
    c = 10.0 ** torch.tensor(log_scales[:k], dtype=torch.float64)
    w, deg = impartial_weights(J @ J.T)
    ws, deg_s = impartial_weights((c[:, None] * J) @ (c[:, None] * J).T)
    assume(not deg and not deg_s)
    d, ds = J.T @ w, (c[:, None] * J).T @ ws
    p, ps = projections(J, w)[0], projections(c[:, None] * J, ws)[0]
    assert (ds / ps - d / p).norm() <= 1e-7 * (d / p).norm()
    assert (ws / ps * c - w / p).norm() <= 1e-7 * (w / p).norm()  # the weights change to w_k / c_k


def test_one_task_zero_gradients_and_scales():
    one = impartial_weights(torch.tensor([[4.0]], dtype=torch.float64))
    assert one[0].tolist() == [1.0] and not one[1]
    zero = impartial_weights(torch.zeros(1, 1, dtype=torch.float64))
    assert zero[0].tolist() == [1.0] and zero[1]  # no direction: the mean, flagged
    all_zero = impartial_weights(torch.zeros(3, 3, dtype=torch.float64))
    assert all_zero[1] and torch.equal(all_zero[0], torch.full((3,), 1 / 3, dtype=torch.float64))
    J = torch.randn(3, 8, dtype=torch.float64)
    for s in (1e-8, 1e-3, 1e3, 1e8):
        torch.testing.assert_close(weights(s * J), weights(J), atol=1e-12, rtol=1e-10)


def test_a_zero_gradient_gets_weight_zero_and_the_others_stay_impartial():
    J = torch.randn(3, 6, dtype=torch.float64)
    J[1] = 0
    w, deg = impartial_weights(J @ J.T)
    assert not deg and w[1] == 0 and torch.isfinite(w).all()
    torch.testing.assert_close(w[[0, 2]], weights(J[[0, 2]]), atol=1e-12, rtol=0)


def test_duplicated_tasks_share_the_weight_of_one():
    J = torch.randn(2, 6, dtype=torch.float64)
    dup = torch.stack([J[0], J[0], J[1]])
    w, w2 = weights(dup), weights(J)
    torch.testing.assert_close(w, torch.stack([w2[0] / 2, w2[0] / 2, w2[1]]), atol=1e-12, rtol=0)
    torch.testing.assert_close(dup.T @ w, J.T @ w2, atol=1e-12, rtol=0)


def test_opposite_gradients_have_no_impartial_direction_and_fall_back_to_the_mean():
    g = torch.randn(5, dtype=torch.float64)
    for J in (torch.stack([g, -3 * g]), torch.stack([g, -g])):
        w, deg = impartial_weights(J @ J.T)
        assert deg and torch.equal(w, torch.full((2,), 0.5, dtype=torch.float64))
    # an opposite pair beside an independent task: the least-squares impartial direction, finite
    J = torch.stack([g, -g, torch.randn(5, dtype=torch.float64)])
    w, deg = impartial_weights(J @ J.T)
    assert torch.isfinite(w).all() and abs(w.sum().item() - 1) < 1e-12


def test_permutation_equivariance():
    J = torch.randn(5, 9, dtype=torch.float64)
    perm = torch.randperm(5)
    torch.testing.assert_close(weights(J[perm]), weights(J)[perm], atol=1e-12, rtol=0)


@pytest.mark.parametrize("head_grad", ["weighted", "own"])
def test_backward_writes_the_impartial_direction_and_weighted_heads(head_grad):
    tasks, net, x, y = make_problem(k=4)
    J, heads, _ = brute_force(net, tasks, x, y)
    info = mk.methods.create("imtl_g", head_grad=head_grad).backward(tasks.losses(net(x), y), net)
    w = form_a(J)
    torch.testing.assert_close(info.weights, w, atol=1e-9, rtol=0)
    torch.testing.assert_close(shared_grad(net), J.T @ w, atol=1e-10, rtol=0)
    assert not info.extras["degenerate"]
    for k, t in enumerate(tasks.names):
        factor = w[k] if head_grad == "weighted" else 1.0
        for p, g in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, factor * g, atol=1e-12, rtol=0)


def test_representation_level_uses_the_representation_gramian():
    tasks, net, x, y = make_problem(k=3)
    J, _, H = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    info = IMTLG(level="representation").backward(tasks.losses(out.predictions, y), net, out)
    torch.testing.assert_close(info.weights, form_a(H), atol=1e-9, rtol=0)
    torch.testing.assert_close(shared_grad(net), J.T @ info.weights, atol=1e-10, rtol=0)


def test_a_task_without_labels_is_left_out():
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    y["t1"] = torch.full_like(y["t1"], float("nan"))
    info = IMTLG().backward(tasks.losses(net(x), y), net)
    assert info.weights[1] == 0
    torch.testing.assert_close(info.weights[[0, 2]], form_a(J[[0, 2]]), atol=1e-9, rtol=0)
