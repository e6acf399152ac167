"""The unlearnable-examples evaluation: the perturbations keep to the 8/255 budget and carry the
labels they should; on Multi-Fashion (slow, needs ``make data-images``) class-wise per-task
patterns take MTAN's clean test accuracy 20 points below random noise of the same budget, and the
test fails if that shortcut effect goes."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

EXAMPLE = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "unlearnable_examples.py"))
EPSILON, TASKS = EXAMPLE["EPSILON"], EXAMPLE["TASKS"]
SHAPE = (1, 28, 28)


def labels(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {t: torch.randint(0, 10, (n,), generator=gen) for t in TASKS}


def test_class_wise_patterns_are_per_task_label_priors_within_the_budget():
    patterns = EXAMPLE["class_wise_patterns"](SHAPE, seed=0)
    left, right = patterns["left"], patterns["right"]
    assert left.shape == right.shape == (10, *SHAPE)
    # the tasks sit on complementary patches: disjoint supports, so the sum never exceeds epsilon
    assert torch.all((left != 0) ^ (right != 0))
    assert torch.allclose(left.abs() + right.abs(), torch.full_like(left, EPSILON))
    assert float((left.flatten(1) @ right.flatten(1).T).abs().max()) == 0.0
    # constant on 4 x 4 patches, different between classes
    assert torch.equal(left[:, :, :4, :4], left[:, :, :1, :1].expand(-1, -1, 4, 4))
    assert len({tuple(p.flatten().sign().tolist()) for p in left}) == 10
    y = labels(50)
    delta = EXAMPLE["class_wise_noise"](y, patterns)
    assert torch.equal(delta[3], left[y["left"][3]] + right[y["right"][3]])
    assert float(delta.abs().max()) <= EPSILON + 1e-7


def test_random_noise_is_label_free_at_the_budget():
    x = torch.rand(64, *SHAPE)
    delta = EXAMPLE["random_noise"](x, seed=0)
    assert torch.allclose(delta.abs(), torch.full_like(delta, EPSILON))
    assert not torch.equal(delta[0], delta[1])
    assert torch.equal(delta, EXAMPLE["random_noise"](x, seed=0))


def test_the_evaluation_refuses_a_perturbation_over_the_budget():
    data = EXAMPLE["MultiTaskTensorDataset"](torch.rand(4, *SHAPE), labels(4))
    with pytest.raises(ValueError, match="exceeds the budget"):
        EXAMPLE["clean_test_accuracy"](data, data, torch.full((4, *SHAPE), 2 * EPSILON), "lenet", "ew")
    with pytest.raises(ValueError, match="NaN or infinite"):
        EXAMPLE["clean_test_accuracy"](data, data, torch.full((4, *SHAPE), float("nan")), "lenet", "ew")
    with pytest.raises(ValueError, match="has shape"):
        EXAMPLE["clean_test_accuracy"](data, data, torch.zeros(3, *SHAPE), "lenet", "ew")
    with pytest.raises(ValueError, match="unknown perturbation"):
        EXAMPLE["perturbation"]("blur", data)


@pytest.mark.slow
def test_class_wise_patterns_make_multi_fashion_unlearnable_for_mtan():
    # the shortcut takes a few hundred steps to win; with fewer pairs one task can keep more
    train, test = EXAMPLE["multi_fashion"](10_000, 2000, seed=0)
    accuracy = {}
    for kind in ("random", "class_wise"):
        delta = EXAMPLE["perturbation"](kind, train, seed=0)
        accuracy[kind] = EXAMPLE["clean_test_accuracy"](train, test, delta, "mtan", "ew", seed=0, epochs=2)
    for task in TASKS:
        assert accuracy["random"][task] > 0.6  # the control learns the clothes
        assert accuracy["class_wise"][task] < accuracy["random"][task] - 0.20
