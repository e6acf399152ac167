"""UW: the optimum exp(s) = L, the official objective's gradient, the clamp that recovers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from tests.conftest import make_problem
from tests.methods.helpers import assert_same_grads, grads, reference_grads, setup


@given(st.lists(st.floats(0.05, 20.0), min_size=1, max_size=4))
@settings(max_examples=10, deadline=None)
def test_uw_optimum_is_the_log_of_the_loss(values):
    # For fixed L_k the objective sum exp(-s)L/2 + s/2 is minimised at exp(s_k) = L_k.
    method = mk.methods.UW(min_log_var=None)
    method.setup([f"t{i}" for i in range(len(values))])
    opt = torch.optim.Adam(method.parameters(), lr=0.08)
    fixed = [torch.tensor(v, requires_grad=True) for v in values]
    for _ in range(800):
        opt.zero_grad()
        method.backward(fixed)
        opt.step()
    torch.testing.assert_close(method.scales.detach().exp(), torch.tensor(values), rtol=2e-3, atol=0)
    opt.zero_grad()
    info = method.backward(fixed)
    torch.testing.assert_close(info.weights, 0.5 * torch.exp(-method.scales.detach()))


def test_uw_gradient_matches_the_official_objective():
    tasks, net, x, y = make_problem(k=3)
    method = setup(mk.methods.UW(init=0.3), tasks, net)
    s = method.scales
    values = list(tasks.losses(net(x), y).values())
    objective = sum(0.5 * torch.exp(-s[i]) * v + 0.5 * s[i] for i, v in enumerate(values))
    ref = reference_grads(net, objective)
    ref_s = s.grad.clone()
    s.grad = None
    method.backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)
    torch.testing.assert_close(s.grad, ref_s)


def test_uw_clamps_the_log_variance_from_below_and_recovers():
    method = mk.methods.UW()
    method.setup(["a"])
    with torch.no_grad():
        method.scales.fill_(-30.0)  # e.g. carried past the bound by Adam's momentum
    info = method.backward([torch.tensor(1e-20, requires_grad=True)])
    assert info.weights.item() == pytest.approx(0.5 * math.exp(10.0))  # the clamped weight
    assert method.scales.grad.item() == 0.0  # a push further down is blocked
    method.scales.grad = None
    method.backward([torch.tensor(5.0, requires_grad=True)])
    assert method.scales.grad.item() < 0  # a loss that grew again pulls s back up
    opt = torch.optim.SGD(method.parameters(), lr=1e-4)
    for _ in range(200):
        opt.zero_grad()
        method.backward([torch.tensor(5.0, requires_grad=True)])
        opt.step()
    assert method.scales.item() > -10.0  # back above the bound (a plain clamp would stay at -30)


def test_trainer_adds_method_parameters_with_their_lr_and_no_weight_decay():
    tasks, net, _, _ = make_problem(k=2, dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    trainer = mk.Trainer(net, tasks, mk.methods.UW(), opt, device="cpu", progress=False)
    group = trainer.optimizer.param_groups[-1]
    assert group["params"] == list(trainer.method.parameters())
    assert group["lr"] == 0.025 and group["weight_decay"] == 0.0
    trainer = mk.Trainer(net, tasks, "imtl_l", torch.optim.SGD(net.parameters(), lr=0.3), device="cpu")
    assert trainer.optimizer.param_groups[-1]["lr"] == 0.3  # IMTL-L: the optimiser's lr (LibMTL)
