"""F-MTL: the spec's distinguishing tests (rho -> 0 limit, separate aggregation on a hand-built
quadratic, the MGDA branch's formula), the perturbation itself, BatchNorm statistics, restored
weights and the heads' perturbed gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlkit as mk
from mtlkit.errors import ConfigError, LifecycleError, NonFiniteLossError, UnknownNameError
from tests.conftest import make_problem

H1 = torch.tensor([[1.0, 0.0], [0.0, 0.1]], dtype=torch.float64)
H2 = torch.tensor([[-1.0, 2.0], [2.0, -2.0]], dtype=torch.float64)


def quadratic_step(method, rho_seen=None):
    """One F-MTL step on L_k = x^T H_k x / 2 at x = (1, 1): g_k = H_k x exactly."""
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)

    def losses():
        return {"a": 0.5 * x @ H1 @ x, "b": 0.5 * x @ H2 @ x + 3.0}

    def closure():
        if rho_seen is not None:
            rho_seen.append(x.detach().clone())
        return losses(), None

    method.setup(["a", "b"])
    info = method.backward(losses(), shared=[x], closure=closure)
    assert torch.equal(x.detach(), torch.ones(2, dtype=torch.float64))  # weights restored
    return x.grad, info


def pcgrad2(g1, g2):
    """PCGrad on two vectors (the result does not depend on the order for two tasks)."""
    p1 = g1 - min(0.0, float(g1 @ g2)) / float(g2 @ g2) * g2
    p2 = g2 - min(0.0, float(g2 @ g1)) / float(g1 @ g1) * g1
    return p1 + p2


def test_separate_aggregation_projects_the_conflicting_flatness_directions():
    rho = 0.3
    x = torch.ones(2, dtype=torch.float64)
    g = [H1 @ x, H2 @ x]
    s = [H @ (x + rho * gk / gk.norm()) for H, gk in zip((H1, H2), g, strict=True)]
    h = [sk - gk for sk, gk in zip(s, g, strict=True)]
    assert float(g[0] @ g[1]) > 0 and float(h[0] @ h[1]) < 0  # aligned losses, conflicting flatness
    expected = pcgrad2(*g) + pcgrad2(*h)
    grad, _ = quadratic_step(mk.methods.create("fmtl_pcgrad", rho=rho))
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    ablation, _ = quadratic_step(mk.methods.create("fmtl_pcgrad", rho=rho, split=False))
    torch.testing.assert_close(ablation, pcgrad2(*s), atol=1e-12, rtol=0)
    assert float((grad - ablation).norm()) > 0.1  # A(g) + A(h) is not A(g + h)


def test_the_perturbation_is_per_task_and_adaptive_scales_it_by_theta_squared():
    for adaptive in (False, True):
        seen: list[torch.Tensor] = []
        quadratic_step(mk.methods.create("fmtl", rho=0.2, adaptive=adaptive), seen)
        x = torch.ones(2, dtype=torch.float64)
        for H, point in zip((H1, H2), seen, strict=True):
            gk = H @ x
            t = x.abs() if adaptive else torch.ones(2, dtype=torch.float64)
            torch.testing.assert_close(point - x, 0.2 * t * t * gk / (t * gk).norm())


def test_the_mgda_branch_combines_unit_directions_times_k():
    rho = 0.3
    x = torch.ones(2, dtype=torch.float64)
    g = [H1 @ x, H2 @ x]
    h = [H @ (x + rho * gk / gk.norm()) - gk for H, gk in zip((H1, H2), g, strict=True)]

    def min_norm_combination(vs):
        u1, u2 = (v / v.norm() for v in vs)
        lam = float(((u2 - u1) @ u2) / ((u1 - u2) @ (u1 - u2)))
        lam = min(1.0, max(0.0, lam))
        return lam * u1 + (1 - lam) * u2

    expected = 2 * (min_norm_combination(g) + min_norm_combination(h))
    grad, _ = quadratic_step(mk.methods.create("fmtl_mgda", rho=rho))
    torch.testing.assert_close(grad, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["fmtl", "fmtl_pcgrad", "fmtl_cagrad"])
def test_rho_to_zero_recovers_the_wrapped_aggregator(name):
    tasks, net, x, y = make_problem(k=3)
    method = mk.methods.create(name, rho=1e-9)
    method.setup(tasks, model=net)
    out = net(x, full_output=True)
    method.backward(
        tasks.losses(out.predictions, y), net, out, closure=lambda: (tasks.losses(net(x), y), None)
    )
    got = [p.grad.clone() for p in net.shared_parameters()]
    net.zero_grad(set_to_none=True)
    base = mk.methods.create(method.base, **method.base_options)
    base.setup(tasks, model=net)
    out = net(x, full_output=True)
    base.backward(tasks.losses(out.predictions, y), net, out)
    for a, b in zip(got, [p.grad for p in net.shared_parameters()], strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_heads_get_their_gradient_at_their_own_perturbed_point():
    tasks, net, x, y = make_problem(k=2)
    rho = 0.1
    method = mk.methods.create("fmtl", rho=rho)
    method.setup(tasks, model=net)
    out = net(x, full_output=True)
    method.backward(
        tasks.losses(out.predictions, y), net, out, closure=lambda: (tasks.losses(net(x), y), None)
    )
    got = {n: [p.grad.clone() for p in net.towers[n].parameters()] for n in ("t0", "t1")}
    shared = net.shared_parameters()
    for name in ("t0", "t1"):
        head = list(net.towers[name].parameters())
        loss = tasks.losses(net(x), y)[name]
        gs = torch.autograd.grad(loss, shared + head)
        flat_s = torch.cat([v.reshape(-1) for v in gs[: len(shared)]])
        flat_h = torch.cat([v.reshape(-1) for v in gs[len(shared) :]])
        saved = [p.detach().clone() for p in shared + head]
        with torch.no_grad():
            off = 0
            for p in shared:
                p.add_(rho * flat_s[off : off + p.numel()].view(p.shape) / flat_s.norm())
                off += p.numel()
            off = 0
            for p in head:
                p.add_(rho * flat_h[off : off + p.numel()].view(p.shape) / flat_h.norm())
                off += p.numel()
        expected = torch.autograd.grad(tasks.losses(net(x), y)[name], head)
        with torch.no_grad():
            for p, v in zip(shared + head, saved, strict=True):
                p.copy_(v)
        for a, b in zip(got[name], expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_only_the_clean_pass_updates_batch_norm_statistics():
    torch.manual_seed(0)
    tasks = mk.TaskSet([mk.Task("a", loss="mse"), mk.Task("b", loss="mse")])
    net = mk.models.SharedBottom(4, tasks, bottom_dims=[8], tower_dims=[4], batch_norm=True).double()
    assert any(isinstance(m, nn.BatchNorm1d) for m in net.modules())
    x = torch.randn(16, 4, dtype=torch.float64)
    y = {"a": torch.randn(16, dtype=torch.float64), "b": torch.randn(16, dtype=torch.float64)}
    method = mk.methods.create("fmtl_pcgrad", rho=0.5)
    method.setup(tasks, model=net)
    out = net(x, full_output=True)
    after_clean = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "tracked" in k}
    assert after_clean
    method.backward(
        tasks.losses(out.predictions, y), net, out, closure=lambda: (tasks.losses(net(x), y), None)
    )
    for k, v in after_clean.items():
        assert torch.equal(net.state_dict()[k], v), k


def test_bad_configurations_and_a_missing_closure_are_named():
    with pytest.raises(UnknownNameError, match="pcgrad"):
        mk.methods.create("fmtl", base="pcgrd")
    with pytest.raises(ConfigError, match="FMTL cannot wrap FMTL"):
        mk.methods.create("fmtl", base="fmtl")
    with pytest.raises(ConfigError, match="level"):
        mk.methods.create("fmtl", base="mgda_ub")
    with pytest.raises(ConfigError, match="own parameters"):
        mk.methods.create("fmtl", base="uw")
    with pytest.raises(ConfigError, match="after each step"):
        mk.methods.create("fmtl", base="famo")
    tasks, net, x, y = make_problem(k=2)
    method = mk.methods.create("fmtl")
    method.setup(tasks, model=net)
    with pytest.raises(LifecycleError, match="closure"):
        method.backward(tasks.losses(net(x), y), net)
    assert all(p.grad is None for p in net.parameters())


def test_a_non_finite_perturbed_loss_changes_nothing():
    tasks, net, x, y = make_problem(k=2)
    method = mk.methods.create("fmtl")
    method.setup(tasks, model=net)
    before = [p.detach().clone() for p in net.parameters()]
    calls = []

    def closure():
        calls.append(1)
        losses = dict(tasks.losses(net(x), y))
        if len(calls) == 2:
            losses["t1"] = losses["t1"] * float("nan")
        return losses, None

    with pytest.raises(NonFiniteLossError, match="t1"):
        method.backward(tasks.losses(net(x), y), net, closure=closure)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


def test_the_trainer_runs_fmtl_and_learns(tmp_path):
    data = mk.data.load_mmoe_synthetic(n_train=256, n_val=64, n_test=64, correlation=0.5, dim=6, seed=0)
    torch.manual_seed(0)
    model = mk.models.MMoE(6, data.tasks, num_experts=2, expert_dims=[16], tower_dims=[8])
    trainer = mk.Trainer(model, data.tasks, "fmtl_pcgrad", device="cpu", progress=False, seed=0)
    before = trainer.evaluate(mk.data.loader(data.val, 64))
    trainer.fit(mk.data.loader(data.train, 32, shuffle=True), epochs=3)
    after = trainer.evaluate(mk.data.loader(data.val, 64))
    for task in data.tasks.names:
        assert after.losses[task] < before.losses[task]
