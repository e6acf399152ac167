"""IMTL-L: at the optimum every scaled loss is 1."""

import torch

import mtlkit as mk


def test_imtl_l_optimum_balances_every_scaled_loss_to_one():
    values = [0.02, 1.0, 37.0]
    method = mk.methods.IMTLL()
    method.setup(["a", "b", "c"])
    opt = torch.optim.Adam(method.parameters(), lr=0.05)
    fixed = [torch.tensor(v, requires_grad=True) for v in values]
    for _ in range(1500):
        opt.zero_grad()
        method.backward(fixed)
        opt.step()
    scaled = method.scales.detach().exp() * torch.tensor(values)
    torch.testing.assert_close(scaled, torch.ones(3), rtol=2e-3, atol=0)
