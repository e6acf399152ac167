"""Krum / Multi-Krum: agreement with a brute-force numpy Krum on explicit distances, robustness to
an adversarial row, TorchJD's plain-distance score, the K >= 2f + 3 condition, degenerate inputs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.errors import ConfigError
from mtlkit.methods.krum import Krum, krum_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def numpy_krum(J, f, m=1, squared=True):
    """Blanchard et al.'s Multi-Krum on explicit vectors: the mean of the m best-scored rows."""
    J = np.asarray(J, dtype=np.float64)
    n = len(J)
    scores = []
    for i in range(n):
        dists = sorted(np.sum((J[i] - J[j]) ** 2) for j in range(n) if j != i)
        if not squared:
            dists = [np.sqrt(v) for v in dists]
        scores.append(sum(dists[: n - f - 2]))
    chosen = np.argsort(scores, kind="stable")[:m]
    return J[chosen].mean(0), chosen


@given(
    k=st.integers(3, 9),
    d=st.integers(2, 8),  # on a line, sums of plain distances tie structurally
    f=st.integers(0, 3),
    m=st.integers(1, 9),
    squared=st.booleans(),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=100, deadline=None)
def test_krum_from_the_gramian_matches_brute_force_krum(k, d, f, m, squared, seed):
    if k < 2 * f + 3:
        f = (k - 3) // 2
    m = min(m, k)
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, generator=gen, dtype=torch.float64)
    w = krum_weights(J @ J.T, f, m, squared)
    ref, chosen = numpy_krum(J.numpy(), f, m, squared)
    assert sorted(w.nonzero().squeeze(1).tolist()) == sorted(chosen.tolist())
    np.testing.assert_allclose((J.T @ w).numpy(), ref, rtol=0, atol=1e-12)
    if k - f - 2 >= 2:  # with one neighbour the closest pair always ties; otherwise random rows do not
        perm = torch.randperm(k, generator=gen)  # permutation equivariance
        torch.testing.assert_close(krum_weights(J[perm] @ J[perm].T, f, m, squared), w[perm], atol=0, rtol=0)
    for scale in (1e-8, 1e8):  # the selection does not depend on the gradients' scale
        Js = J * scale
        torch.testing.assert_close(krum_weights(Js @ Js.T, f, m, squared), w, atol=0, rtol=0)


def test_an_adversarial_row_barely_moves_krum_but_moves_the_mean():
    gen = torch.Generator().manual_seed(0)
    honest = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) + 0.01 * torch.randn(
        6, 4, generator=gen, dtype=torch.float64
    )
    for attack in (1e6 * torch.randn(4, generator=gen, dtype=torch.float64), -10 * honest.mean(0)):
        J = torch.cat([honest[:3], attack[None], honest[3:]])
        for m in (1, 3, 6):
            w = krum_weights(J @ J.T, 1, m)
            assert w[3] == 0
            assert (J.T @ w - honest.mean(0)).norm() < 0.05
        assert (J.mean(0) - honest.mean(0)).norm() > 1.0


def test_torchjd_semantics_plain_distances_can_choose_differently():
    # row 3 has one very close and one far neighbour (plain sum 1.91, squared 3.61), row 1 two
    # neighbours at distance 1 (plain 2, squared 2): TorchJD's plain distances pick row 3, the paper row 1
    J = torch.tensor([[-1.0], [0.0], [1.0], [2.9], [2.91]], dtype=torch.float64)
    for squared, expected in ((True, 1), (False, 3)):
        w = krum_weights(J @ J.T, 1, 1, squared)
        _, chosen = numpy_krum(J.numpy(), 1, 1, squared)
        assert w.nonzero().squeeze(1).tolist() == chosen.tolist() == [expected]


def test_degenerate_inputs():
    g = torch.randn(5, dtype=torch.float64)
    one = g[None]
    assert torch.equal(krum_weights(one @ one.T, 0), torch.ones(1, dtype=torch.float64))  # K = 1
    two = torch.stack([g, -g])
    assert torch.equal(krum_weights(two @ two.T, 0), torch.full((2,), 0.5, dtype=torch.float64))
    dup = torch.stack([g, g, g, -g, torch.zeros(5, dtype=torch.float64)])  # duplicated, opposite, zero
    w = krum_weights(dup @ dup.T, 1)
    assert torch.equal(w, torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))  # ties: lower index
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    assert torch.isfinite(krum_weights(zeros @ zeros.T, 0, 2, squared=False)).all()


def test_the_byzantine_condition_is_checked_at_setup_and_per_batch():
    with pytest.raises(ConfigError, match="at least 2 \\* 1 \\+ 3 = 5 tasks"):
        Krum(n_byzantine=1).setup(["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="n_selected=4 exceeds"):
        Krum(n_selected=4).setup(["a", "b", "c"])
    tasks, net, x, y = make_problem(k=5)
    y["t1"] = torch.full_like(y["t1"], float("nan"))  # 4 labelled tasks < 2f + 3
    with pytest.raises(ConfigError, match="this batch has 4"):
        Krum(n_byzantine=1).backward(tasks.losses(net(x), y), net)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_krum_end_to_end_matches_brute_force_and_heads_get_their_own_gradient(level):
    tasks, net, x, y = make_problem(k=6)
    J, heads, H = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    info = mk.methods.create("krum", n_byzantine=1, n_selected=2, level=level).backward(
        tasks.losses(out.predictions, y), net, out
    )
    _, chosen = numpy_krum((J if level == "parameter" else H).numpy(), 1, 2)
    w = torch.zeros(6, dtype=torch.float64)
    w[torch.from_numpy(chosen)] = 0.5
    torch.testing.assert_close(info.weights, w, atol=0, rtol=0)
    torch.testing.assert_close(shared_grad(net), J.T @ w, atol=1e-12, rtol=0)
    for k, t in enumerate(tasks.names):  # every head learns, selected or not
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, ref, atol=1e-12, rtol=0)
