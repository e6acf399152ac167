"""Coordinate-wise trimmed mean: exact agreement with numpy, robustness to adversarial rows, the
K > 2b condition, degenerate inputs, end to end with a missing label."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.errors import ConfigError
from mtlkit.methods.trimmed_mean import TrimmedMean, trimmed_mean
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def numpy_trimmed_mean(J, b):
    s = np.sort(np.asarray(J, dtype=np.float64), axis=0)
    return s[b : len(s) - b].mean(axis=0)


@given(k=st.integers(1, 9), d=st.integers(1, 12), b=st.integers(0, 4), seed=st.integers(0, 10_000))
@settings(max_examples=80, deadline=None)
def test_trimmed_mean_matches_numpy_and_is_permutation_invariant(k, d, b, seed):
    b = min(b, (k - 1) // 2)
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -8, 9, (k, 1), generator=gen
    )
    out = trimmed_mean(J, b)
    tol = 1e-14 * float(J.abs().max())  # round-off of a sum of entries of very different sizes
    np.testing.assert_allclose(out.numpy(), numpy_trimmed_mean(J.numpy(), b), rtol=0, atol=tol)
    torch.testing.assert_close(trimmed_mean(J[torch.randperm(k, generator=gen)], b), out, atol=tol, rtol=0)
    lo, hi = J.sort(0).values[b], J.sort(0).values[k - 1 - b]
    assert (out >= lo).all() and (out <= hi).all()


def test_adversarial_rows_barely_move_the_trimmed_mean():
    gen = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.01 * torch.randn(6, 50, generator=gen, dtype=torch.float64)
    for attack in (
        1e8 * torch.randn(2, 50, generator=gen, dtype=torch.float64),
        torch.full((2, 50), -1e6).double(),
    ):
        J = torch.cat([honest[:2], attack, honest[2:]])
        out = trimmed_mean(J, 2)
        assert (out - honest.mean(0)).abs().max() < 0.03
        assert (J.mean(0) - honest.mean(0)).abs().max() > 1e3


def test_degenerate_inputs_and_the_trim_condition():
    g = torch.randn(1, 7, dtype=torch.float64)
    torch.testing.assert_close(trimmed_mean(g, 0), g[0], atol=0, rtol=0)  # K = 1
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    assert torch.equal(trimmed_mean(zeros, 1), torch.zeros(4, dtype=torch.float64))
    assert TrimmedMean().trim_number == 0
    with pytest.raises(ConfigError, match="trim_number <= 1"):
        TrimmedMean(trim_number=2).setup(["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="more than 2 rows"):
        trimmed_mean(torch.ones(2, 3), 1)
    tasks, net, x, y = make_problem(k=3)
    y["t0"] = torch.full_like(y["t0"], float("nan"))
    with pytest.raises(ConfigError, match="this batch has 2"):
        TrimmedMean(trim_number=1).backward(tasks.losses(net(x), y), net)
    assert all(p.grad is None for p in net.parameters())


def test_trimmed_mean_end_to_end_leaves_out_a_task_without_labels():
    tasks, net, x, y = make_problem(k=6)
    y["t4"] = torch.full_like(y["t4"], float("nan"))
    J, heads, _ = brute_force(net, tasks, x, y)
    info = mk.methods.create("trimmed_mean", trim_number=2).backward(tasks.losses(net(x), y), net)
    ref = numpy_trimmed_mean(J[[0, 1, 2, 3, 5]].numpy(), 2)
    np.testing.assert_allclose(shared_grad(net).numpy(), ref, rtol=0, atol=1e-14)
    assert info.weights is None
    for k, t in enumerate(tasks.names):
        for p, r in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, r, atol=1e-12, rtol=0)
