"""SI: the gradient of the sum of log losses, invariant to loss scales."""

import torch

import mtlkit as mk
from tests.conftest import make_problem
from tests.methods.helpers import assert_same_grads, grads, reference_grads


def test_si_is_the_gradient_of_the_sum_of_log_losses():
    tasks, net, x, y = make_problem(k=3)
    ref = reference_grads(net, sum(v.log() for v in tasks.losses(net(x), y).values()))
    info = mk.methods.SI().backward(tasks.losses(net(x), y), net)
    assert_same_grads(grads(net), ref)
    torch.testing.assert_close(info.weights.double(), 1 / info.losses.double())


def test_si_direction_is_invariant_to_loss_scales_but_not_to_nonaffine_transforms():
    tasks, net, x, y = make_problem(k=2)

    def direction(transform):
        net.zero_grad(set_to_none=True)
        losses = tasks.losses(net(x), y)
        mk.methods.SI().backward({k: transform(i, v) for i, (k, v) in enumerate(losses.items())})
        return torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()])

    base = direction(lambda i, v: v)
    torch.testing.assert_close(direction(lambda i, v: v * (1e-3 if i == 0 else 250.0)), base)
    # (a power L^p only rescales log L: its direction is SI's too; L + L^2 is truly non-affine)
    other = direction(lambda i, v: v + v**2)
    assert not torch.allclose(other / other.norm(), base / base.norm(), atol=1e-3)
