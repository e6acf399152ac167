"""The transfer-attack family: budgets kept, the signed step of FGSM, iterative attacks at least as
strong, the TI kernel and DI transform, success rates counted on clean-correct images, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlkit as mk
from mtlkit.merging.attacks import (
    ATTACKS,
    attack,
    diverse_input,
    gaussian_kernel,
    input_gradient,
    smooth,
    success_rate,
)


def _classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP fitted on a separable 8 x 8 image problem (bright left vs right half)."""
    torch.manual_seed(0)
    x = torch.rand(256, 8, 8) * 0.5
    y = torch.randint(0, 2, (256,))
    x[y == 0, :, :4] += 0.4
    x[y == 1, :, 4:] += 0.4
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x[:64], y[:64]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_keeps_the_budget_and_the_pixel_range_and_leaves_the_model_alone(name):
    model, x, y = _classifier()
    model.zero_grad(set_to_none=True)
    adv = attack(name, model, x, y, eps=0.05, seed=1)
    assert adv.shape == x.shape
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert all(p.grad is None for p in model.parameters())
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(model(adv), y)) > float(loss(model(x), y))  # every attack raises the loss
    if name in ("pgd", "di_fgsm", "vmi_fgsm"):  # seeded: reproducible
        assert torch.equal(adv, attack(name, model, x, y, eps=0.05, seed=1))


def test_fgsm_is_one_signed_gradient_step_and_iterative_attacks_are_at_least_as_strong():
    model, x, y = _classifier()
    expected = (x + 0.1 * input_gradient(model, x, y).sign()).clamp(0, 1)
    torch.testing.assert_close(attack("fgsm", model, x, y, eps=0.1), expected, atol=0, rtol=0)
    rates = {
        n: success_rate(model, x, attack(n, model, x, y, eps=0.2), y) for n in ("fgsm", "pgd", "mi_fgsm")
    }
    assert rates["pgd"] >= rates["fgsm"] and rates["mi_fgsm"] >= rates["fgsm"] - 0.05
    assert rates["pgd"] > 0.5  # the halves differ by 0.4: a 0.2 budget can cross over


def test_the_ti_kernel_and_the_di_transform():
    k = gaussian_kernel(7)
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6) and k.shape == (7, 7)
    assert float(k[3, 3]) == float(k.max()) and torch.allclose(k, k.T)
    flat = torch.ones(2, 16, 16)
    torch.testing.assert_close(smooth(flat, k)[:, 3:-3, 3:-3], flat[:, 3:-3, 3:-3])  # interior unchanged
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 20, 20)
    assert diverse_input(images, g, prob=0.0) is images
    moved = diverse_input(images, g, prob=1.0)
    assert moved.shape == images.shape and not torch.equal(moved, images)


def test_success_counts_only_images_the_model_had_right():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])  # the third is wrong to begin with
    adv = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # fools the first only
    assert success_rate(model, x, adv, y) == 0.5


def test_bad_input_is_named():
    model, x, y = _classifier()
    with pytest.raises(mk.errors.UnknownNameError):
        attack("carlini", model, x, y, eps=0.1)
    with pytest.raises(mk.errors.ConfigError, match="eps"):
        attack("fgsm", model, x, y, eps=0.0)
    with pytest.raises(mk.errors.ConfigError, match=r"\[0, 1\]"):
        attack("fgsm", model, x * 300, y, eps=0.1)
    with pytest.raises(mk.errors.ShapeMismatchError):
        attack("ti_fgsm", model, x.flatten(1), y, eps=0.1)
