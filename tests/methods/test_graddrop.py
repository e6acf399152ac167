"""GradDrop: one sign survives per coordinate, agreement gives the plain sum, leak = 1 gives the sum,
the Monte Carlo expectation, one task, the paper's representation-level statistic (sign(A), batch
sum) against a re-implementation, scale invariance without an epsilon, state and missing labels."""

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError, EngineError
from mtlkit.methods.graddrop import GradDrop
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def drop(J, **options):
    """One parameter-level GradDrop direction of the rows J."""
    method = GradDrop(level="parameter", **options)
    method.setup([f"t{i}" for i in range(len(J))])
    return method.direction(J, torch.ones(len(J), dtype=torch.float64))


def signed_sums(J):
    return J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)


def mixed_rows(k=5, d=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=gen, dtype=torch.float64)


def test_one_sign_survives_at_every_coordinate():
    J = mixed_rows()
    out = drop(J, seed=3)
    pos, neg = signed_sums(J)
    is_pos = torch.isclose(out, pos, rtol=1e-12, atol=0)
    is_neg = torch.isclose(out, neg, rtol=1e-12, atol=0)
    assert (is_pos | is_neg).all()  # never a mixture of signs (a per-task draw would mix them)
    assert is_pos.any() and is_neg.any()


def test_agreeing_coordinates_give_the_plain_sum_deterministically():
    J = mixed_rows(4, 600)
    J[:, :200] = J[:, :200].abs()  # all positive
    J[:, 200:400] = -J[:, 200:400].abs()  # all negative
    J[1:, 400:410] = 0.0  # one task only: also agreement
    for seed in range(10):
        out = drop(J, seed=seed)
        torch.testing.assert_close(out[:410], J[:, :410].sum(0), atol=0, rtol=1e-14)


@pytest.mark.parametrize("leak", [1.0, 1])
def test_full_leak_is_the_sum(leak):
    J = mixed_rows(4, 500)
    torch.testing.assert_close(drop(J, leak=leak), J.sum(0), atol=0, rtol=1e-14)
    torch.testing.assert_close(drop(J, leak=[1.0, 1.0, 1.0, 1.0]), J.sum(0), atol=0, rtol=1e-14)


def test_monte_carlo_expectation_is_purity_weighted():
    base = torch.tensor(
        [[1.0, -2.0, 0.5, 3.0], [-0.5, 1.0, -1.5, 1.0], [2.0, -0.3, 0.2, -4.0]], dtype=torch.float64
    )
    tiles, rounds = 2500, 4  # 10^4 independent draws per coordinate
    J = base.repeat(1, tiles)
    method = GradDrop(level="parameter", seed=0)
    method.setup(["a", "b", "c"])
    samples = torch.stack([method.direction(J, torch.ones(3)).view(tiles, 4) for _ in range(rounds)])
    mean = samples.reshape(-1, 4).mean(0)
    pos, neg = signed_sums(base)
    purity = 0.5 * (1 + base.sum(0) / base.abs().sum(0))
    expected = purity * pos + (1 - purity) * neg
    sigma = (purity * (1 - purity)).sqrt() * (pos - neg).abs() / (tiles * rounds) ** 0.5
    assert ((mean - expected).abs() < 5 * sigma).all(), (mean, expected, sigma)


def test_one_task_is_its_gradient_at_both_levels():
    g = mixed_rows(1, 1000)
    for seed in range(5):
        assert torch.equal(drop(g, seed=seed), g[0])
    tasks, net, x, y = make_problem(k=1)
    J, _, _ = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    GradDrop().backward(tasks.losses(out.predictions, y), net, out)
    torch.testing.assert_close(shared_grad(net), J[0], atol=1e-14, rtol=0)


def test_zero_coordinates_and_scale_invariance_without_epsilon():
    J = mixed_rows(3, 400)
    J[:, :50] = 0.0
    out = drop(J, seed=1)
    assert torch.isfinite(out).all() and (out[:50] == 0).all()
    for scale in (1e-8, 1e8):
        torch.testing.assert_close(drop(J * scale, seed=1), out * scale, atol=0, rtol=1e-13)
    agree = J[:, 50:].abs() * 1e-9  # every task positive, entries far below LibMTL's epsilon
    torch.testing.assert_close(drop(agree, seed=1), agree.sum(0), atol=0, rtol=1e-14)
    assert not torch.allclose(
        drop(agree, seed=1, eps=1e-7), agree.sum(0), rtol=1e-6, atol=0
    )  # eps drops some


def test_seed_and_state_make_the_draws_reproducible():
    J = mixed_rows(3, 300)
    assert not torch.equal(drop(J, seed=0), drop(J, seed=1))
    a = GradDrop(level="parameter", seed=7)
    a.setup(["a", "b", "c"])
    a.direction(J, torch.ones(3))
    saved = a.state_dict()
    b = GradDrop(level="parameter", seed=7)
    b.load_state_dict(saved)
    assert torch.equal(a.direction(J, torch.ones(3)), b.direction(J, torch.ones(3)))


def test_per_task_leak_follows_the_active_tasks():
    tasks, net, x, y = make_problem(k=3)
    y["t0"] = torch.full_like(y["t0"], float("nan"))
    J, _, _ = brute_force(net, tasks, x, y)
    GradDrop(level="parameter", leak=[0.0, 1.0, 1.0]).backward(tasks.losses(net(x), y), net)
    torch.testing.assert_close(shared_grad(net), J[1] + J[2], atol=1e-14, rtol=0)  # t1, t2 leak fully
    with pytest.raises(ConfigError, match="2 leak values for 3 tasks"):
        GradDrop(leak=[0.0, 1.0]).setup(tasks)


def tanh_problem(k=3):
    torch.manual_seed(4)
    tasks = mk.TaskSet([mk.Task(f"t{i}", loss="mse") for i in range(k)])
    net = mk.models.SharedBottom(5, tasks, bottom_dims=[7, 4], tower_dims=[3], activation="tanh").double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = {t: torch.randn(6, dtype=torch.float64) for t in tasks.names}
    return tasks, net, x, y


@pytest.mark.parametrize("sign_input", [True, False])
@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_representation_level_is_the_papers_activation_statistic(sign_input, leak):
    tasks, net, x, y = tanh_problem()
    _, heads, H = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    z = out.representation
    GradDrop(sign_input=sign_input, leak=leak, seed=11).backward(tasks.losses(out.predictions, y), net, out)
    # re-implementation: s_k = sum over the batch of sign(A) * dL_k/dA, one draw per feature
    rows = H.view(3, *z.shape)
    stat = (rows * (z.detach().sign() if sign_input else 1.0)).sum(1)
    purity = 0.5 * (1 + stat.sum(0) / stat.abs().sum(0))
    u = torch.rand(z.shape[1:], generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    mask = ((stat > 0) & (u < purity)) | ((stat < 0) & (u >= purity))
    cotangent = (rows * (leak + (1 - leak) * mask.double())[:, None, :]).sum(0)
    z_ref = net(x, full_output=True).representation
    expected = torch.autograd.grad(z_ref, net.shared_parameters(), cotangent)
    torch.testing.assert_close(
        shared_grad(net), torch.cat([g.reshape(-1) for g in expected]), atol=1e-14, rtol=0
    )
    for k, t in enumerate(tasks.names):  # heads get their own gradient
        for p, r in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, r, atol=1e-12, rtol=0)


def test_representation_level_full_leak_and_the_sign_correction_matters():
    tasks, net, x, y = tanh_problem()
    J, _, _ = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    GradDrop(leak=1.0).backward(tasks.losses(out.predictions, y), net, out)
    torch.testing.assert_close(shared_grad(net), J.sum(0), atol=1e-14, rtol=0)
    results = []
    for sign_input in (True, False):
        net.zero_grad(set_to_none=True)
        out = net(x, full_output=True)
        GradDrop(sign_input=sign_input, seed=2).backward(tasks.losses(out.predictions, y), net, out)
        results.append(shared_grad(net).clone())
    assert not torch.allclose(results[0], results[1])


def test_representation_level_needs_the_output_and_defaults():
    tasks, net, x, y = make_problem(k=2)
    with pytest.raises(EngineError, match="full_output"):
        GradDrop().backward(tasks.losses(net(x), y), net)
    method = GradDrop()
    method.setup(tasks)
    with pytest.raises(EngineError, match="representation of the current step"):
        method.direction(torch.ones(2, 5, dtype=torch.float64), torch.ones(2))
    d = mk.methods.create("graddrop")
    assert (d.level, d.leak, d.sign_input, d.eps, d.max_norm, d.seed, d.head_grad) == (
        "representation",
        0.0,
        True,
        0.0,
        None,
        0,
        "own",
    )
    assert d.features is None


def test_parameter_level_clipping_like_the_fairgrad_baseline():
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    GradDrop(level="parameter", leak=1.0, max_norm=1e-3).backward(tasks.losses(net(x), y), net)
    total = J.sum(0)
    torch.testing.assert_close(shared_grad(net), total * 1e-3 / (total.norm() + 1e-6), atol=1e-15, rtol=0)
