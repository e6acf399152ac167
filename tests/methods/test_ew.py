"""EW: the summed loss's gradient, fixed weights and Task(weight=...)."""

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError
from tests.conftest import make_problem
from tests.methods.helpers import shared_grad


def test_ew_gradient_equals_autograd_of_the_summed_loss():
    tasks, net, x, y = make_problem(k=3)
    (sum(tasks.losses(net(x), y).values())).backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    info = mk.methods.create("ew").backward(tasks.losses(net(x), y), net)
    for p, r in zip(net.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r, atol=1e-12, rtol=0)
    assert info.weights.tolist() == [1.0, 1.0, 1.0] and info.level == "loss"


def test_ew_fixed_weights():
    tasks, net, x, y = make_problem(k=2)
    losses = tasks.losses(net(x), y)
    (0.5 * losses["t0"] + 2.0 * losses["t1"]).backward()
    ref = shared_grad(net).clone()
    net.zero_grad(set_to_none=True)
    mk.methods.EW(weights={"t0": 0.5, "t1": 2.0}).backward(tasks.losses(net(x), y))
    torch.testing.assert_close(shared_grad(net), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("given", ["object", "name"])
def test_task_weights_reach_ew_however_it_is_given(given):
    # Trainer(..., mk.methods.create("ew")) used to ignore Task(weight=...); "ew" by name honoured it
    _, net, x, y = make_problem(k=2, dtype=torch.float32)
    tasks = mk.TaskSet([mk.Task("t0", weight=0.5), mk.Task("t1", weight=2.0)])
    method = mk.methods.create("ew") if given == "object" else "ew"
    trainer = mk.Trainer(net, tasks, method, device="cpu", progress=False)
    info = trainer.train_step((x.float(), {k: v.float() for k, v in y.items()}))
    assert info.weights.tolist() == [0.5, 2.0]


def test_task_weights_are_refused_by_methods_that_would_ignore_them():
    tasks = mk.TaskSet([mk.Task("a", weight=0.5), mk.Task("b")])
    with pytest.raises(ConfigError, match="only to linear scalarisation"):
        mk.methods.create("mgda").setup(tasks)
    with pytest.raises(ConfigError, match="set them in one place"):
        mk.methods.EW(weights=[1.0, 3.0]).setup(tasks)
    mk.methods.EW(weights=[0.5, 1.0]).setup(tasks)  # the same values twice are fine
