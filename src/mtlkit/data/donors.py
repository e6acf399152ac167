"""Real data shipped inside registry packages ("donors"): found by path without importing the
donor, checked by size and SHA-256, processed once into an atomically written cache, and a clear
error with the exact install command when anything is missing or different.

Every real dataset goes through this module, so the checks and the messages are the same for all.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mtlkit.errors import DatasetNotAvailableError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class DonorFile:
    """One file of a donor: its path below the donor's root, size in bytes and SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Donor:
    """A registry package that carries a dataset's files.

    ``root`` finds the folder the files' paths are relative to (raising
    :class:`DatasetNotAvailableError` when the donor is absent); ``install`` is the exact command
    that installs it.
    """

    name: str
    install: str
    root: Callable[[], Path]
    files: Mapping[str, DonorFile] = field(default_factory=dict)

    def paths(self) -> dict[str, Path]:
        """Every file's path, after checking that it exists."""
        root = self.root()
        paths = {key: root / f.path for key, f in self.files.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise DatasetNotAvailableError(
                f"{self.name} is installed but {missing} is missing; reinstall with `{self.install}`."
            )
        return paths

    def verify(self, paths: Mapping[str, Path], checksum: bool = True) -> None:
        """Sizes (and, with ``checksum``, SHA-256 digests) against the known release."""
        for key, expected in self.files.items():
            path = paths[key]
            size = path.stat().st_size
            if size != expected.size:
                raise DatasetNotAvailableError(
                    f"{path} has {size} bytes, expected {expected.size}; reinstall with `{self.install}`."
                )
            if checksum:
                digest = sha256_file(path)
                if digest != expected.sha256:
                    raise DatasetNotAvailableError(
                        f"{path} has SHA-256 {digest}, expected {expected.sha256}; reinstall with "
                        f"`{self.install}`."
                    )


def package_root(module: str, install: str, below: str = "") -> Callable[[], Path]:
    """The folder ``below`` inside an installed Python package, found without importing it (a
    donor's ``__init__`` may need dependencies we do not install)."""

    def find() -> Path:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise DatasetNotAvailableError(f"The data need the package {module!r}: run `{install}`.")
        return Path(next(iter(spec.submodule_search_locations))) / below

    return find


def folder_root(default: Path, variable: str, install: str) -> Callable[[], Path]:
    """A fixed folder (e.g. where a Debian package puts its files), or ``$variable`` if set."""

    def find() -> Path:
        folder = Path(os.environ.get(variable, default))
        if not folder.is_dir():
            raise DatasetNotAvailableError(
                f"{folder} not found: run `{install}`, or point ${variable} at a folder with the files."
            )
        return folder

    return find


def save_cache(stem: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically (temporary files renamed into
    place, the tensors last), so an interrupted write leaves no cache that looks complete."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors_path, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    # private temporary names: several processes may build the same cache at once (suite workers)
    token = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp_meta, tmp_tensors = (
        meta_path.with_suffix(".json" + token),
        tensors_path.with_suffix(".safetensors" + token),
    )
    tmp_meta.write_text(json.dumps(dict(meta)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_tensors))
    tmp_meta.replace(meta_path)
    tmp_tensors.replace(tensors_path)


def load_cache(stem: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The cached tensors and metadata, or ``None`` when absent or damaged (then rebuild: a
    damaged cache is never trusted)."""
    tensors_path, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (tensors_path.is_file() and meta_path.is_file()):
        return None
    try:
        return load_file(str(tensors_path)), json.loads(meta_path.read_text())
    except Exception:
        return None
