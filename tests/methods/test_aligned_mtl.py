"""Aligned-MTL: whitening of the task gradients, the official rank tolerance, degenerate inputs."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.methods.aligned_mtl import AlignedMTL, balance_transform
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad

EPS32 = float(np.finfo(np.float32).eps)


def reference_weights(J, scale_mode="min"):
    """The official algorithm restated in numpy: eigenpairs above K * eps32 * lambda_max, sorted
    descending; B = sqrt(sigma) V diag(lambda)^-1/2 V^T; w = B 1."""
    G = np.asarray(J @ J.T, dtype=np.float64)
    lam, V = np.linalg.eigh(G)
    keep = lam > lam.max() * len(G) * EPS32
    lam, V = lam[keep][::-1], V[:, keep][:, ::-1]
    sigma = {"min": lam[-1], "median": np.sort(lam)[(len(lam) - 1) // 2], "rmse": lam.mean()}[scale_mode]
    B = np.sqrt(sigma) * (V / np.sqrt(lam)) @ V.T
    return torch.from_numpy(B.sum(1)), int(keep.sum())


def method_weights(J, **options):
    method = AlignedMTL(**options)
    method.setup([f"t{i}" for i in range(len(J))])
    return method.weights(J @ J.T, torch.ones(len(J), dtype=torch.float64))


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_gradients_are_orthogonal_with_equal_norms(scale_mode):
    J = torch.randn(4, 50, dtype=torch.float64)
    G = J @ J.T
    B, rank = balance_transform(G, scale_mode)
    lam = torch.linalg.eigvalsh(G)  # ascending
    sigma = {"min": lam[0], "median": lam[1], "rmse": lam.mean()}[scale_mode]
    aligned = B @ J
    assert rank == 4
    torch.testing.assert_close(
        aligned @ aligned.T, sigma * torch.eye(4, dtype=torch.float64), atol=1e-8 * sigma, rtol=0
    )
    torch.testing.assert_close(method_weights(J, scale_mode=scale_mode), reference_weights(J, scale_mode)[0])


def test_orthogonal_equal_norm_gradients_are_left_alone():
    J = 2.5 * torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))[0].T  # G = 6.25 I
    B, _ = balance_transform(J @ J.T)
    torch.testing.assert_close(B, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(J.T @ method_weights(J), J.sum(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(J.T @ method_weights(J, reduction="mean"), J.mean(0), atol=1e-12, rtol=0)


def test_rank_deficient_gradients_keep_the_leading_eigenpairs():
    J = torch.randn(3, 10, dtype=torch.float64)
    J[2] = J[0] + J[1]
    B, rank = balance_transform(J @ J.T)
    w_ref, rank_ref = reference_weights(J)
    assert rank == rank_ref == 2
    torch.testing.assert_close(method_weights(J), w_ref, atol=1e-10, rtol=1e-10)
    lam, V = torch.linalg.eigh(J @ J.T)
    P = V[:, 1:] @ V[:, 1:].T  # projector on the two kept eigenvectors
    torch.testing.assert_close(B @ (J @ J.T) @ B, lam[1] * P, atol=1e-10 * lam[1], rtol=0)


def test_the_rank_tolerance_is_float32_epsilon_as_in_the_official_code():
    # singular values 1, 1e-2, 3e-4: eigenvalues 1, 1e-4, 9e-8 < 3 * eps32 = 3.6e-7 -> rank 2,
    # although float64 resolves the third direction exactly
    Q = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0]
    R = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    J = R @ torch.diag(torch.tensor([1.0, 1e-2, 3e-4], dtype=torch.float64)) @ Q.T
    _, rank = balance_transform(J @ J.T)
    w_ref, rank_ref = reference_weights(J)
    assert rank == rank_ref == 2
    torch.testing.assert_close(method_weights(J), w_ref, atol=1e-8, rtol=1e-8)
    J[:, :] = R @ torch.diag(torch.tensor([1.0, 1e-2, 1e-3], dtype=torch.float64)) @ Q.T  # 1e-6: kept
    assert balance_transform(J @ J.T)[1] == 3


def test_one_task_zero_gradients_and_scale_invariance():
    g = torch.randn(1, 7, dtype=torch.float64)
    assert method_weights(g).tolist() == pytest.approx([1.0], abs=1e-15)
    zero = torch.zeros(3, 7, dtype=torch.float64)
    assert method_weights(zero).tolist() == [1.0, 1.0, 1.0]  # rank 0: identity transform
    assert method_weights(zero, reduction="mean").tolist() == pytest.approx([1 / 3] * 3)
    J = torch.randn(4, 9, dtype=torch.float64)
    J[3] = 0  # a zero gradient is outside the kept eigenvectors: weight 0
    w = method_weights(J)
    assert abs(w[3]) < 1e-12 and torch.isfinite(w).all()
    for s in (1e-8, 1e8):
        torch.testing.assert_close(method_weights(s * J), w, atol=1e-10, rtol=1e-10)


@given(k=st.integers(1, 6), extra=st.integers(0, 6), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_whitening_and_permutation_equivariance(k, extra, seed):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, k + extra, generator=gen, dtype=torch.float64)
    perm = torch.randperm(k, generator=gen)
    w = method_weights(J)
    torch.testing.assert_close(method_weights(J[perm]), w[perm], atol=1e-8 * w.abs().max(), rtol=0)
    B, rank = balance_transform(J @ J.T)
    assume(int(rank) == k)  # a nearly singular square draw falls under the official tolerance
    lam_min = torch.linalg.eigvalsh(J @ J.T)[0]
    aligned = B @ J
    torch.testing.assert_close(
        aligned @ aligned.T, lam_min * torch.eye(k, dtype=torch.float64), atol=1e-7 * lam_min, rtol=0
    )


@pytest.mark.parametrize("name", ["aligned_mtl", "aligned_mtl_ub"])
def test_backward_sums_the_aligned_gradients_and_heads_get_their_own(name):
    tasks, net, x, y = make_problem(k=3)
    J, heads, H = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    info = mk.methods.create(name).backward(tasks.losses(out.predictions, y), net, out)
    w_ref, rank = reference_weights(J if name == "aligned_mtl" else H)
    assert int(info.extras["rank"]) == rank == 3
    torch.testing.assert_close(info.weights, w_ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(shared_grad(net), J.T @ w_ref, atol=1e-10, rtol=1e-9)
    for k, t in enumerate(tasks.names):
        for p, g in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=0)


def test_ub_is_a_variant_and_the_mean_reduction_divides_by_k():
    assert isinstance(mk.methods.create("aligned_mtl_ub"), AlignedMTL)
    assert mk.methods.create("aligned_mtl_ub").level == "representation"
    J = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(method_weights(J, reduction="mean"), method_weights(J) / 4)


def test_a_task_without_labels_is_left_out():
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    y["t1"] = torch.full_like(y["t1"], float("nan"))
    info = AlignedMTL(reduction="mean").backward(tasks.losses(net(x), y), net)
    assert info.weights[1] == 0
    torch.testing.assert_close(
        info.weights[[0, 2]], reference_weights(J[[0, 2]])[0] / 2, atol=1e-9, rtol=1e-9
    )
