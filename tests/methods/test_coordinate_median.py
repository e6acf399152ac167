"""Coordinate-wise median: exact agreement with numpy.median (odd and even K), robustness to an
adversarial minority, equality with the largest trimmed mean, degenerate inputs, end to end."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.methods.coordinate_median import coordinate_median
from mtlkit.methods.trimmed_mean import trimmed_mean
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


@given(k=st.integers(1, 10), d=st.integers(1, 12), seed=st.integers(0, 10_000))
@settings(max_examples=80, deadline=None)
def test_median_matches_numpy_and_the_largest_trimmed_mean(k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -8, 9, (k, 1), generator=gen
    )
    out = coordinate_median(J)
    np.testing.assert_allclose(out.numpy(), np.median(J.numpy(), axis=0), rtol=1e-15, atol=0)
    torch.testing.assert_close(out, trimmed_mean(J, (k - 1) // 2), atol=0, rtol=1e-15)
    torch.testing.assert_close(coordinate_median(J[torch.randperm(k, generator=gen)]), out, atol=0, rtol=0)


def test_an_adversarial_minority_barely_moves_the_median():
    gen = torch.Generator().manual_seed(0)
    honest = 2.0 + 0.01 * torch.randn(5, 40, generator=gen, dtype=torch.float64)
    attack = 1e8 * torch.randn(4, 40, generator=gen, dtype=torch.float64)
    J = torch.cat([attack[:2], honest, attack[2:]])  # 4 of 9 rows adversarial
    out = coordinate_median(J)
    assert (out >= honest.min(0).values).all() and (out <= honest.max(0).values).all()
    assert (J.mean(0) - honest.mean(0)).abs().max() > 1e5


def test_degenerate_inputs():
    g = torch.randn(1, 6, dtype=torch.float64)
    torch.testing.assert_close(coordinate_median(g), g[0], atol=0, rtol=0)  # K = 1
    two = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(coordinate_median(two), two.mean(0), atol=1e-15, rtol=0)  # K = 2: the mean
    big = torch.full((2, 3), 1.5e308, dtype=torch.float64)
    assert torch.isfinite(coordinate_median(big)).all()  # no overflow in the middle average
    opposite = torch.cat([two[:1], -two[:1]])
    assert torch.equal(coordinate_median(opposite), torch.zeros(6, dtype=torch.float64))


def test_median_end_to_end_matches_brute_force():
    tasks, net, x, y = make_problem(k=4)
    J, heads, _ = brute_force(net, tasks, x, y)
    info = mk.methods.create("coordinate_median").backward(tasks.losses(net(x), y), net)
    np.testing.assert_allclose(shared_grad(net).numpy(), np.median(J.numpy(), axis=0), rtol=0, atol=1e-14)
    assert info.weights is None
    for k, t in enumerate(tasks.names):
        for p, r in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, r, atol=1e-12, rtol=0)


def test_the_representation_level_takes_the_median_of_the_representation_gradients():
    import mtlkit as mk
    from tests.conftest import make_problem
    from tests.methods.helpers import shared_grad

    tasks, net, x, y = make_problem(k=3)
    out = net(x, full_output=True)
    losses = tasks.losses(out.predictions, y)
    z = out.representation
    rows = torch.stack([torch.autograd.grad(losses[n], z, retain_graph=True)[0] for n in tasks.names])
    cotangent = rows.median(dim=0).values  # K = 3: the middle value
    expected = torch.autograd.grad(z, list(net.shared_parameters()), cotangent, retain_graph=True)
    mk.methods.create("coordinate_median", level="representation").backward(losses, net, out)
    torch.testing.assert_close(
        shared_grad(net), torch.cat([g.reshape(-1) for g in expected]), atol=1e-12, rtol=0
    )
