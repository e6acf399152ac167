"""GLS: the gradient of the geometric mean, computed without under- or overflow."""

import math

import torch

import mtlkit as mk
from tests.conftest import make_problem
from tests.methods.helpers import assert_same_grads, grads, reference_grads


def test_gls_is_the_gradient_of_the_geometric_mean():
    tasks, net, x, y = make_problem(k=3)
    values = list(tasks.losses(net(x), y).values())
    ref = reference_grads(net, torch.stack(values).prod() ** (1 / 3))
    mk.methods.GLS().backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)


def test_gls_weights_stay_finite_where_the_product_underflows():
    k = 400
    losses = torch.full((k,), 1e-3, dtype=torch.float64)
    losses[0] = 5e-3
    assert torch.prod(losses) == 0  # the direct product underflows even in float64
    w = mk.methods.GLS().loss_weights(losses, torch.ones(k, dtype=torch.bool))
    gm = math.exp(float(losses.log().mean()))
    torch.testing.assert_close(w, gm / (k * losses))
