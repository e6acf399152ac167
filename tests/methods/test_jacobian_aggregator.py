"""The JacobianAggregator base, with two small aggregators defined here (not registered)."""

import pytest
import torch

from mtlkit.methods import JacobianAggregator
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


class RowMedian(JacobianAggregator):
    """The coordinate-wise median of the task gradients: a direction no Gramian can express."""

    def direction(self, jacobian, losses):
        return jacobian.median(dim=0).values


class KeepsRows(JacobianAggregator):
    """Keeps the previous step's rows (as GradVac or MoCo keep gradient statistics)."""

    keeps_gradients = True

    def direction(self, jacobian, losses):
        self.kept = jacobian  # would be overwritten by the engine's next call if not owned
        return jacobian.sum(0)


def test_the_direction_is_written_and_heads_get_their_own_gradient():
    tasks, net, x, y = make_problem(k=3)
    J, heads, _ = brute_force(net, tasks, x, y)
    info = RowMedian().backward(tasks.losses(net(x), y), net)
    torch.testing.assert_close(shared_grad(net), J.median(dim=0).values, atol=1e-12, rtol=0)
    for k, t in enumerate(tasks.names):
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, ref, atol=1e-12, rtol=0)
    assert info.weights is None and info.level == "parameter"
    torch.testing.assert_close(info.grad_norms, J.norm(dim=1), atol=1e-12, rtol=0)
    assert "weight/t0" not in info.scalars()


def test_unlabelled_tasks_are_left_out_and_a_gradscaler_scale_is_transparent():
    tasks, net, x, y = make_problem(k=3)
    y = dict(y)
    y["t1"] = torch.full_like(y["t1"], float("nan"))
    J, _, _ = brute_force(net, tasks, x, y)
    scale = 2.0**10
    RowMedian().backward(tasks.losses(net(x), y).map(lambda v: v * scale), net, loss_scale=scale)
    torch.testing.assert_close(shared_grad(net) / scale, J[[0, 2]].median(dim=0).values, atol=1e-12, rtol=0)


class KeepsRowsCarelessly(KeepsRows):
    keeps_gradients = False


@pytest.mark.parametrize("cls", [KeepsRows, KeepsRowsCarelessly])
def test_rows_kept_across_steps_are_owned_only_when_declared(cls):
    tasks, net, x, y = make_problem(k=2)
    method = cls()
    method.backward(tasks.losses(net(x), y), net)
    previous, first = method.kept, method.kept.clone()
    net.zero_grad()
    method.backward(tasks.losses(net(x * 3), y), net)
    if cls is KeepsRows:
        torch.testing.assert_close(previous, first, atol=0, rtol=0)  # its own memory
    else:
        assert not torch.equal(previous, first)  # the engine's buffer: overwritten by the next step


def test_all_finite_sees_nan_and_both_infinities_in_one_reduction():
    from mtlkit.methods.gradient_methods import all_finite

    x = torch.randn(4, 1000)
    assert all_finite(x) and all_finite(torch.empty(0, 3))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 517] = bad
        assert not all_finite(y)
