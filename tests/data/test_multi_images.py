"""Overlaid two-task image sets: the canvas construction, pairing, and the real sets' sizes."""

from __future__ import annotations

import pytest
import torch

from mtlkit.data import multi_images
from tests.data.image_data import require_image_data


def test_overlay_places_left_top_left_and_right_bottom_right_with_the_maximum() -> None:
    left = torch.zeros(1, 28, 28, dtype=torch.uint8)
    left[0, :4, :4] = 255  # the top-left corner of the canvas
    right = torch.zeros(1, 28, 28, dtype=torch.uint8)
    right[0, -4:, -4:] = 255  # the bottom-right corner of the canvas
    out = multi_images.overlay(left, right)
    assert out.shape == (1, 1, 28, 28) and out.dtype == torch.float32
    assert float(out[0, 0, :3, :3].min()) > 0.9 and float(out[0, 0, -3:, -3:].min()) > 0.9
    assert float(out[0, 0, 10:18, 10:18].max()) == 0.0
    # overlapping pixels take the larger value, never the sum
    full = torch.full((1, 28, 28), 0.6)
    assert float(multi_images.overlay(full, full).max()) <= 0.6 + 1e-6
    with pytest.raises(ValueError, match="28, 28"):
        multi_images.overlay(torch.zeros(1, 28, 28), torch.zeros(1, 27, 27))


def test_every_source_is_a_left_item_twice_and_labels_follow_their_items() -> None:
    n = 50
    images = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 28, 28) / n
    labels = torch.arange(n) % 10
    data = multi_images._pairs(images, labels, images, labels, torch.Generator().manual_seed(0))
    assert len(data) == 2 * n
    # the top-left pixel shows the left item only: its value identifies the source image
    left_source = torch.round(data.inputs[:, 0, 0, 0] * n).long()
    assert torch.bincount(left_source, minlength=n).tolist() == [2] * n
    assert torch.equal(data.targets["left"], labels[left_source])
    right_source = torch.round(data.inputs[:, 0, -1, -1] * n).long()
    assert torch.equal(data.targets["right"], labels[right_source])
    assert torch.bincount(right_source, minlength=n).tolist() == [2] * n


def test_source_splits_are_disjoint_and_sized() -> None:
    images = torch.arange(100, dtype=torch.float32)[:, None, None].expand(100, 28, 28)
    parts = multi_images._split_sources(
        images, torch.arange(100), (70, 10, 20), torch.Generator().manual_seed(1)
    )
    ids = [set(labels.tolist()) for _, labels in parts]
    assert [len(i) for i in ids] == [70, 10, 20] and not (
        ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]
    )


@pytest.mark.slow
def test_the_real_sets_sizes_tasks_and_disjoint_sources() -> None:
    require_image_data()
    fashion = multi_images.load_multi_fashion(seed=0)
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (108_000, 12_000, 20_000)
    assert fashion.tasks.names == ["left", "right"]
    mnist = multi_images.load_multi_mnist_10k(seed=0)
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (14_000, 2_000, 4_000)
    mixed = multi_images.load_multi_fashion_mnist(seed=0)
    assert len(mixed.train) == 14_000 and int(mixed.train.targets["right"].max()) == 9
