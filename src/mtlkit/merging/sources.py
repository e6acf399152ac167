"""Where merged weights come from: a model, a state dict, one safetensors file, or a sharded
safetensors folder with an index (as the Hugging Face hub writes them), read one tensor at a time.

Files are read with ``safetensors.safe_open``: the header is parsed once and each tensor is loaded
only when asked for, so a per-tensor merge holds about (experts + 2) tensors at a time. Nothing is
ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from mtlkit.errors import CheckpointError, ConfigError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class TensorSource:
    """A read-only set of named tensors. ``load(name)`` returns a CPU tensor."""

    #: what the source is, for error messages ("expert 'mnist' (/path/file.safetensors)")
    label: str = ""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def load(self, name: str) -> Tensor:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def aliases(self) -> dict[str, str]:
        """``{name: first name}`` for keys that share storage with an earlier key (tied weights)."""
        return {}

    def where(self, name: str) -> str:
        """The file holding ``name`` (or the source label) for error messages."""
        return self.label

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


class MemorySource(TensorSource):
    """A state dict (or a module's), kept as given."""

    def __init__(self, tensors: Mapping[str, Tensor], label: str) -> None:
        self.tensors = dict(tensors)
        self.label = label
        bad = [k for k, v in self.tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise ConfigError(f"{label}: entries {bad[:5]} are not tensors.")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def load(self, name: str) -> Tensor:
        return self.tensors[name].detach()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def aliases(self) -> dict[str, str]:
        seen: dict[tuple[Any, ...], str] = {}
        out = {}
        for name, t in self.tensors.items():
            if t.numel() == 0:
                continue
            key = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
            if key in seen:
                out[name] = seen[key]
            else:
                seen[key] = name
        return out


class SafetensorsSource(TensorSource):
    """One safetensors file, or a folder of shards with ``model.safetensors.index.json``."""

    def __init__(self, path: str | Path, label: str) -> None:
        path = Path(path)
        self.label = f"{label} ({path})"
        if path.is_dir():
            index = path / INDEX_NAME
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CheckpointError(
                        f"{self.label}: {INDEX_NAME} has no valid weight_map ({exc})."
                    ) from exc
                self.files = {name: path / shard for name, shard in weight_map.items()}
            elif (path / SINGLE_NAME).exists():
                self.files = {}
                self._index_file(path / SINGLE_NAME)
            else:
                raise CheckpointError(
                    f"{self.label}: neither {INDEX_NAME} nor {SINGLE_NAME} is in this folder."
                )
            missing = sorted({str(f) for f in self.files.values() if not f.exists()})
            if missing:
                raise CheckpointError(
                    f"{self.label}: the index names shard(s) that do not exist: {missing[:3]}."
                )
        elif path.exists():
            self.files = {}
            self._index_file(path)
        else:
            raise CheckpointError(f"{self.label}: no such file or folder.")
        self._handles: dict[Path, Any] = {}

    def _index_file(self, file: Path) -> None:
        for name in self._open(file).keys():  # noqa: SIM118 (a safe_open handle, not a dict)
            self.files[name] = file

    def _open(self, file: Path) -> Any:
        handles = self.__dict__.setdefault("_handles", {})
        if file not in handles:
            try:
                handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(
                    f"{file} is not a readable safetensors file ({exc}); mtlkit reads weights from safetensors "
                    "only (convert a PyTorch checkpoint with safetensors.torch.save_file)."
                ) from exc
        return handles[file]

    def keys(self) -> list[str]:
        return list(self.files)

    def load(self, name: str) -> Tensor:
        # a short-lived handle: pages read through a long-lived memory map stay resident, so a
        # merge that kept one open per file would end up holding every file in memory
        file = self.files[name]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name).clone()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read: {exc}") from exc

    def _slice(self, name: str) -> Any:
        file = self.files[name]
        try:
            return self._open(file).get_slice(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.label}: {file} does not hold tensor {name!r} ({exc}).") from exc

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.files[name]}: tensor {name!r} has dtype {code}, which mtlkit cannot merge."
            )
        return SAFETENSORS_DTYPES[code]

    def where(self, name: str) -> str:
        file = self.files.get(name)
        return str(file) if file is not None else self.label


def open_source(obj: Any, label: str) -> TensorSource:
    """A :class:`TensorSource` for a module, a state dict, a safetensors file or a shard folder."""
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, nn.Module):
        return MemorySource(obj.state_dict(keep_vars=False), label)
    if isinstance(obj, Mapping):
        return MemorySource(obj, label)
    if isinstance(obj, (str, Path)):
        return SafetensorsSource(obj, label)
    raise ConfigError(
        f"{label}: expected an nn.Module, a state dict, a safetensors file or a folder of shards, "
        f"got {type(obj).__name__}."
    )


def is_batchnorm_statistic(name: str) -> bool:
    """Running statistics of a normalisation layer (by the PyTorch names)."""
    return name.endswith(("running_mean", "running_var"))


def is_mergeable(dtype: torch.dtype) -> bool:
    """Floating tensors are merged; integer and boolean ones (counters, ids) are copied."""
    return dtype.is_floating_point


__all__ = [
    "MemorySource",
    "SafetensorsSource",
    "TensorSource",
    "is_batchnorm_statistic",
    "is_mergeable",
    "open_source",
]
