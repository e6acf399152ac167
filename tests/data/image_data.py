"""The slow image-data tests' precondition, shared."""

from __future__ import annotations

import pytest

from mtlkit.data import images
from mtlkit.errors import DatasetNotAvailableError


def require_image_data() -> None:
    """Fail (not skip: the slow suite installs them) when the packaged image files are missing."""
    try:
        images.load_mnist_10k()
        images.load_fashion_mnist("test")
    except DatasetNotAvailableError as error:
        pytest.fail(f"the image datasets are not installed: run `make data-images` ({error})")
