"""FAMO: its surrogate's gradient, the logit update of the official code, the clip, no Jacobian."""

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import LifecycleError
from tests.conftest import make_problem
from tests.methods.helpers import assert_same_grads, grads, reference_grads, setup


def test_famo_effective_weights_are_the_gradient_of_its_surrogate():
    tasks, net, x, y = make_problem(k=3)
    method = setup(mk.methods.FAMO(max_norm=None), tasks, net)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
    z = torch.softmax(method.logits.detach(), 0).double()
    values = list(tasks.losses(net(x), y).values())
    d = torch.stack(values) + 1e-8
    c = (z / d.detach()).sum()
    ref = reference_grads(net, (z / c * d.log()).sum())
    info = method.backward(tasks.losses(net(x), y), net)
    assert_same_grads(grads(net), ref)
    assert float(info.weights.sum()) == pytest.approx(1.0)


def test_famo_shifts_weight_to_the_task_that_improved_less():
    method = mk.methods.FAMO(max_norm=None)
    method.setup(["fast", "slow"])
    before = [torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)]
    method.backward(before)
    method.after_step([torch.tensor(0.5), torch.tensor(1.0)])
    z = torch.softmax(method.logits.detach(), 0)
    assert z[1] > 0.5 > z[0]


def test_famo_logit_update_matches_the_official_formula():
    method = mk.methods.FAMO(lr=0.025, gamma=1e-3, max_norm=None)
    method.setup(["a", "b", "c"])
    xi = torch.zeros(3, requires_grad=True)
    ref_opt = torch.optim.Adam([xi], lr=0.025, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        prev = torch.rand(3, generator=gen) + 0.1
        curr = prev * (0.5 + torch.rand(3, generator=gen))
        method.backward([v.clone().requires_grad_() for v in prev])
        method.after_step(list(curr))
        delta = (prev + 1e-8).log() - (curr + 1e-8).log()
        (g,) = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)
        ref_opt.zero_grad()
        xi.grad = g
        ref_opt.step()
        torch.testing.assert_close(method.logits.detach(), xi.detach())


def test_famo_clips_the_shared_gradient_and_never_builds_task_gradients(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("FAMO must not compute per-task gradients")

    for name in ("jacobian", "parameter_gramian", "representation_gradients", "task_gradient_norms"):
        monkeypatch.setattr(mk.GradientEngine, name, forbidden)
    tasks, net, x, y = make_problem(k=3)
    (sum(tasks.losses(net(x), y).values()) * 1e3).backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in net.shared_parameters()]) > 1.0
    net.zero_grad(set_to_none=True)
    mk.methods.FAMO(max_norm=0.5).backward(tasks.losses(net(x), y).map(lambda v: v * 1e3), net)
    total = torch.nn.utils.get_total_norm([p.grad for p in net.shared_parameters()])
    assert float(total) == pytest.approx(0.5)


def test_famo_clip_without_the_shared_parameters_is_an_error():
    tasks, net, x, y = make_problem(k=2)
    with pytest.raises(mk.errors.EngineError, match="max_norm"):
        mk.methods.FAMO().backward(tasks.losses(net(x), y))


def test_famo_state_is_a_copy_not_the_live_adam_state():
    a = mk.methods.FAMO(max_norm=None)
    a.setup(["x", "y"])
    for _ in range(2):
        a.backward([torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)])
        a.after_step([torch.tensor(0.5), torch.tensor(1.9)])
    saved = a.state_dict()
    frozen = repr(saved)
    b = mk.methods.FAMO(max_norm=None)
    b.load_state_dict(saved)
    b_state = repr(b.state_dict())
    a.backward([torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)])
    a.after_step([torch.tensor(0.3), torch.tensor(1.9)])
    assert repr(saved) == frozen  # a later step does not change a saved state
    assert repr(b.state_dict()) == b_state  # nor a method loaded from it


def test_famo_after_step_needs_a_backward_and_cannot_be_skipped():
    method = mk.methods.FAMO(max_norm=None)
    with pytest.raises(LifecycleError, match="preceding backward"):
        method.after_step([torch.tensor(1.0)])
    method.backward([torch.tensor(1.0, requires_grad=True)])
    with pytest.raises(LifecycleError, match="after_step"):  # forgotten: the logits would never move
        method.backward([torch.tensor(1.0, requires_grad=True)])
