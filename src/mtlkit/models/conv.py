"""Small convolutional pieces for the image architectures (cross-stitch, MTAN): conv blocks,
encoder stages and pooled task heads."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtlkit.errors import ConfigError, ShapeMismatchError
from mtlkit.models.base import mlp


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """``Conv 3x3 (padding 1) -> BatchNorm -> ReLU``, the layer of the official MTAN SegNet."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def encoder_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """One encoder stage: two conv blocks, then 2x2 max pooling."""
    return nn.Sequential(
        conv_block(in_channels, out_channels), conv_block(out_channels, out_channels), nn.MaxPool2d(2)
    )


def pooled_head(
    channels: int, tower_dims: Sequence[int], out_features: int, activation: str
) -> nn.Sequential:
    """A task head on a feature map: global average pooling, then an MLP tower."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        mlp(channels, tower_dims, activation, out_features=out_features),
    )


def image_channels(in_features: int | Sequence[int], model: str) -> tuple[int, tuple[int, ...] | None]:
    """The channel count and, when given, the full (C, H, W) shape an image model reads."""
    if isinstance(in_features, int):
        if in_features < 1:
            raise ConfigError(f"{model}: in_features (input channels) must be positive, got {in_features}.")
        return in_features, None
    shape = tuple(int(d) for d in in_features)
    if len(shape) != 3 or any(d < 1 for d in shape):
        raise ConfigError(f"{model} reads images: in_features is C or (C, H, W), got {in_features}.")
    return shape[0], shape


def check_image(x: Tensor, channels: int, shape: tuple[int, ...] | None, model: str) -> None:
    ok = isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == channels
    if ok and shape is not None:
        ok = tuple(x.shape[1:]) == shape
    if not ok:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        want = f"(batch, {', '.join(map(str, shape))})" if shape else f"(batch, {channels}, H, W)"
        raise ShapeMismatchError(f"{model} expects images of shape {want}, got {got}.")


def check_channels(channels: Sequence[int], model: str, least: int = 1) -> list[int]:
    out = [int(c) for c in channels]
    if len(out) < least or any(c < 1 for c in out):
        raise ConfigError(
            f"{model} needs at least {least} positive stage widths (channels), got {list(channels)}."
        )
    return out
