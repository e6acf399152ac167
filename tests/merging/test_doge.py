"""DOGE: the closed-form gradient against autograd, the shared-subspace projector, the formula
without optimisation, the surrogate falling, the global top-k mask and the tensor selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlkit as mk
from mtlkit.merging.doge import DogeStep, doge_gradient, doge_loss, shared_basis, shared_projection


def _family(tasks: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    experts = {}
    for t in range(tasks):
        state = {k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()}
        experts[f"t{t}"] = state
    return base.state_dict(), experts


def test_the_closed_form_gradient_is_autograds():
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    lambdas = torch.rand(3, generator=g, dtype=torch.float64)
    delta = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    doge_loss(taus, lambdas, delta).backward()
    torch.testing.assert_close(doge_gradient(taus, lambdas, delta.detach()), delta.grad, atol=1e-10, rtol=0)


def test_the_fast_step_is_the_projected_closed_form_gradient():
    g = torch.Generator().manual_seed(2)
    taus = torch.randn(4, 9, 7, generator=g, dtype=torch.float64)
    lambdas = torch.rand(4, generator=g, dtype=torch.float64)
    delta = torch.randn(9, 7, generator=g, dtype=torch.float64)
    reference = doge_gradient(taus, lambdas, delta)
    reference = reference - shared_projection(taus, 3) @ reference
    torch.testing.assert_close(
        DogeStep(taus, lambdas, shared_basis(taus, 3))(delta), reference, atol=1e-10, rtol=0
    )


def test_the_shared_projection_is_an_orthogonal_projector_of_the_documented_rank():
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 24, 18, generator=g, dtype=torch.float64)
    p = shared_projection(taus, subspace=6)  # r = 18: 6 directions per task, 3 shared ones kept
    torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)
    torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)
    assert round(float(torch.trace(p))) == 18 // 6
    top = torch.linalg.svd(taus[0], full_matrices=False)[0][:, :1]  # inside the tasks' span
    assert float(torch.linalg.vector_norm(p @ top)) > 0.5


def test_without_steps_and_with_every_entry_kept_doge_is_norm_weighted_task_arithmetic():
    base, experts = _family()
    out = mk.merging.merge(base, experts, "doge", steps=0, density=1.0).state_dict
    for name in ("0.weight", "2.weight"):  # theta_0 + sum_t (0.07 / ||tau_t||) tau_t
        taus = [(e[name] - base[name]).double() for e in experts.values()]
        expected = base[name].double() + sum(0.07 / t.norm() * t for t in taus)
        torch.testing.assert_close(out[name].double(), expected, atol=1e-6, rtol=0)
    for name in ("0.bias", "2.bias"):  # not matrices: theta_0 (official)
        assert torch.equal(out[name], base[name])
    mean = mk.merging.merge(base, experts, "doge", steps=0, density=1.0, others="mean").state_dict
    expected_bias = base["0.bias"] + torch.stack(
        [e["0.bias"] - base["0.bias"] for e in experts.values()]
    ).mean(0)
    torch.testing.assert_close(mean["0.bias"], expected_bias, atol=1e-6, rtol=0)


def test_the_optimised_modification_lowers_the_surrogate():
    base, experts = _family()
    name = "0.weight"
    taus = torch.stack([(e[name] - base[name]).double() for e in experts.values()])
    lambdas = 0.07 / torch.linalg.vector_norm(taus.flatten(1), dim=1)
    fixed = mk.merging.merge(base, experts, "doge", steps=0, density=1.0).state_dict[name].double()
    moved = mk.merging.merge(base, experts, "doge", steps=400, lr=1e-3, density=1.0).state_dict[name].double()
    delta = (
        moved - fixed
    ) / lambdas.sum()  # with every entry kept the update is sum_t lambda_t (tau_t + delta)
    assert float(delta.abs().max()) > 0
    assert float(doge_loss(taus, lambdas, delta)) < 0.9 * float(
        doge_loss(taus, lambdas, torch.zeros_like(delta))
    )


def test_the_global_mask_keeps_the_top_share_of_each_task_over_the_selected_matrices():
    base, experts = _family(tasks=1)
    out = mk.merging.merge(base, experts, "doge", steps=0, density=0.3).state_dict
    kept = sum(int((out[n] != base[n]).sum()) for n in ("0.weight", "2.weight"))
    total = sum(base[n].numel() for n in ("0.weight", "2.weight"))
    assert kept == int(0.3 * total) + 1  # the official kthvalue keeps one more than int(0.3 n)


def test_selection_and_bad_settings():
    base, experts = _family()
    out = mk.merging.merge(base, experts, "doge", steps=0, select=r"^2\.").state_dict
    assert torch.equal(out["0.weight"], base["0.weight"]) and not torch.equal(
        out["2.weight"], base["2.weight"]
    )
    with pytest.raises(mk.errors.ConfigError, match="no 2-D"):
        mk.merging.merge(base, experts, "doge", select="nothing")
    with pytest.raises(mk.errors.ConfigError, match="subspace"):
        mk.merging.merge(base, experts, "doge", subspace=0)
