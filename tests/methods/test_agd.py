"""AGD: the spec's exact two-step update identity, one task per step, schedules and resume."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError

H = [
    torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64),
    torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64),
]
A = [torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([-0.5, 2.0], dtype=torch.float64)]


def losses(theta):
    return {f"t{k}": 0.5 * (theta - A[k]) @ H[k] @ (theta - A[k]) for k in range(2)}


def grad(k, theta):
    return H[k] @ (theta - A[k])


def test_two_round_robin_steps_follow_the_alternating_update_identity():
    eta = 0.1
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=eta)
    method = mk.methods.create("agd", schedule="round_robin")
    for _ in range(2):
        opt.zero_grad()
        method.backward(losses(theta), shared=[theta])
        opt.step()
    theta0 = torch.zeros(2, dtype=torch.float64)
    theta1 = theta0 - eta * grad(0, theta0)
    expected = theta1 - eta * grad(1, theta1)
    torch.testing.assert_close(theta.detach(), expected, atol=1e-15, rtol=0)
    summed = theta0 - eta * (grad(0, theta0) + grad(1, theta0))
    # the difference to the summed-loss step is eta^2 H_2 g_1 exactly (quadratic losses)
    torch.testing.assert_close(theta.detach() - summed, eta**2 * H[1] @ grad(0, theta0), atol=1e-15, rtol=0)


def test_each_step_trains_exactly_one_task():
    method = mk.methods.create("agd", schedule="weighted", weights=[0.75, 0.25], seed=3)
    method.setup(["t0", "t1"])
    picked = []
    for _ in range(400):
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        info = method.backward(losses(theta), shared=[theta])
        assert sorted(info.weights.tolist()) == [0.0, 1.0]
        k = int(info.weights.argmax())
        torch.testing.assert_close(theta.grad, grad(k, torch.zeros(2, dtype=torch.float64)))
        picked.append(k)
    assert 0.68 < picked.count(0) / 400 < 0.82


def test_a_task_without_labels_is_never_drawn():
    method = mk.methods.create("agd", schedule="round_robin")
    method.setup(["t0", "t1"])
    for _ in range(5):
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        info = method.backward(mk.TaskLosses(losses(theta), torch.tensor([0, 4])), shared=[theta])
        assert info.weights.tolist() == [0.0, 1.0]


def test_schedule_options_are_checked():
    with pytest.raises(ConfigError, match="needs weights"):
        mk.methods.create("agd", schedule="weighted")
    with pytest.raises(ConfigError, match="would ignore it"):
        mk.methods.create("agd", weights=[1, 2])
    with pytest.raises(ConfigError, match="one value per task"):
        mk.methods.create("agd", schedule="proportional", sizes=[10, 20, 30]).setup(["a", "b"])
