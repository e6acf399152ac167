"""STCH: warm-up, nadir epoch, then the smooth Tchebycheff gradient; the limits in mu."""

import torch

import mtlkit as mk
from tests.conftest import make_problem
from tests.methods.helpers import assert_same_grads, end_epoch, grads, reference_grads


def test_stch_warmup_then_nadir_then_smooth_tchebycheff():
    tasks, net, x, y = make_problem(k=3)
    method = mk.methods.STCH(mu=0.7, warmup_epochs=1)
    values = list(tasks.losses(net(x), y).values())
    # warm-up: the gradient of sum log(L + 1e-20)
    ref = reference_grads(net, sum(torch.log(v + 1e-20) for v in values))
    method.begin_epoch()
    method.backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)
    method.on_epoch_end()
    assert method.phase == "nadir"
    recorded = []
    method.begin_epoch()
    for scale in (1.0, 3.0):
        recorded.append(torch.tensor([float(v.detach()) * scale for v in values], dtype=torch.float64))
        method.backward([v * scale for v in tasks.losses(net(x), y).values()])
    method.on_epoch_end()
    torch.testing.assert_close(method.nadir_point, (recorded[0] + recorded[1]) / 2)
    net.zero_grad(set_to_none=True)
    values = list(tasks.losses(net(x), y).values())
    logs = torch.stack([torch.log(v / n + 1e-20) for v, n in zip(values, method.nadir_point, strict=True)])
    ref = reference_grads(net, 3 * 0.7 * torch.logsumexp(logs / 0.7, dim=0))
    method.begin_epoch()
    info = method.backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)
    assert info.extras["phase"] == "stch"
    end_epoch(method)


def test_stch_limits_in_mu():
    losses = torch.tensor([0.3, 2.0, 0.9], dtype=torch.float64)
    nadir = [1.0, 1.0, 1.0]
    active = torch.ones(3, dtype=torch.bool)
    sharp = mk.methods.STCH(mu=1e-4, nadir=nadir)
    sharp.setup(["a", "b", "c"])
    w = sharp.loss_weights(losses, active)  # -> K e_argmax / L_argmax (Tchebycheff)
    torch.testing.assert_close(w, torch.tensor([0.0, 3 / 2.0, 0.0], dtype=torch.float64))
    smooth = mk.methods.STCH(mu=1e6, nadir=nadir)
    smooth.setup(["a", "b", "c"])
    torch.testing.assert_close(smooth.loss_weights(losses, active), 1 / losses, rtol=1e-5, atol=0)  # -> SI
