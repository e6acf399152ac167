"""Soft parameter sharing (spec test A10): the penalties' forms, and the two limits on a convex
problem solved exactly (one Newton step on a quadratic)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError, UnknownNameError
from mtlkit.models.soft_sharing import coupling_penalty

TASKS = mk.TaskSet([mk.Task("a"), mk.Task("b"), mk.Task("c")])


def test_penalty_forms():
    torch.manual_seed(0)
    groups = [
        [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)],
        [torch.randn(5, dtype=torch.float64) for _ in range(3)],
    ]
    pairwise = sum((g[s] - g[t]).pow(2).sum() for g in groups for s, t in itertools.combinations(range(3), 2))
    torch.testing.assert_close(coupling_penalty(groups, "l2"), pairwise)
    mean = sum((w - torch.stack(g).mean(0)).pow(2).sum() for g in groups for w in g)
    torch.testing.assert_close(coupling_penalty(groups, "mean"), mean)
    torch.testing.assert_close(coupling_penalty(groups, "l2"), 3 * coupling_penalty(groups, "mean"))
    trace = sum(torch.linalg.svdvals(torch.stack([w.reshape(-1) for w in g])).sum() for g in groups)
    torch.testing.assert_close(coupling_penalty(groups, "trace"), trace)
    same = [[groups[0][0]] * 3]
    assert coupling_penalty(same, "l2") < 1e-25 and coupling_penalty(same, "mean") < 1e-25


def fit_exactly(strength: float, penalty: str) -> tuple[mk.models.SoftSharing, torch.Tensor, dict]:
    """Linear task networks, squared loss plus the penalty: a quadratic, minimised by one Newton
    step from anywhere."""
    torch.manual_seed(0)
    model = mk.models.SoftSharing(
        3, TASKS, hidden_dims=(), coupled="all", penalty=penalty, strength=strength
    ).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = {
        t: x @ torch.randn(3, 1, dtype=torch.float64) + 0.1 * torch.randn(40, 1, dtype=torch.float64)
        for t in TASKS.names
    }
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def objective(theta):
        offset, named = 0, {}
        for name, p in model.named_parameters():
            named[name] = theta[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        full = torch.func.functional_call(model, named, (x,), {"full_output": True})
        losses = sum((full.predictions[t] - y[t]).pow(2).mean() for t in TASKS.names)
        return losses + sum(full.aux_losses.values()) if full.aux_losses else losses

    grad = torch.autograd.functional.jacobian(objective, flat)
    hess = torch.autograd.functional.hessian(objective, flat)
    theta = flat - torch.linalg.solve(hess, grad)
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return model, x, y


def test_zero_strength_gives_independent_least_squares():
    model, x, y = fit_exactly(0.0, "l2")
    design = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    for t in TASKS.names:
        coef = torch.linalg.lstsq(design, y[t]).solution.squeeze(1)
        layer = model.outputs[t]
        torch.testing.assert_close(torch.cat([layer.weight[0], layer.bias]), coef, atol=1e-9, rtol=0)


@pytest.mark.parametrize("penalty", ["l2", "mean"])
def test_huge_strength_ties_the_networks(penalty):
    model, _, _ = fit_exactly(1e6, penalty)
    ws = [torch.cat([model.outputs[t].weight.reshape(-1), model.outputs[t].bias]) for t in TASKS.names]
    for a, b in itertools.combinations(ws, 2):
        assert (a - b).abs().max() < 1e-4


def test_soft_sharing_trains_each_network_with_its_own_gradient_under_any_method():
    torch.manual_seed(0)
    model = mk.models.SoftSharing(4, TASKS, hidden_dims=(8,), strength=0.0)
    x = torch.randn(16, 4)
    y = {t: torch.randn(16, 1) for t in TASKS.names}
    for name in ("mgda", "upgrad"):
        method = mk.methods.create(name)
        out = model(x, full_output=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = method.backward(TASKS.losses(out.predictions, y), model, out)
        assert any("nothing to combine" in str(w.message) for w in caught)
        assert info.extras["nothing_shared"] and info.weights.tolist() == [1.0, 1.0, 1.0]
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        out = model(x)
        sum((out[t] - y[t]).pow(2).mean() for t in TASKS.names).backward()
        for g, p in zip(got, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad)
        model.zero_grad()


def test_soft_sharing_options_are_checked():
    with pytest.raises(UnknownNameError, match="penalty"):
        mk.models.SoftSharing(4, TASKS, penalty="l1")
    with pytest.raises(ConfigError, match="one out_features"):
        mk.models.SoftSharing(4, TASKS, coupled="all", out_features={"a": 2})
    with pytest.raises(ConfigError, match="hidden layers"):
        mk.models.SoftSharing(4, TASKS, hidden_dims=())
    with pytest.raises(ConfigError, match="strength"):
        mk.models.SoftSharing(4, TASKS, strength=-1.0)
