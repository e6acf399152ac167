"""Atomic, weights-only checkpoints.

A checkpoint is a directory ``step-XXXXXXXX/`` holding

- ``model.safetensors`` -- the model's tensors (safetensors: no code, no pickle);
- ``state.pt`` -- optimiser, scheduler, method state, RNG states and counters, read back with
  ``torch.load(weights_only=True)`` (tensors and plain containers only);
- ``manifest.json`` -- sizes and SHA-256 of both files.

It is written into a temporary directory, flushed, and renamed into place; a pointer file
(``latest`` for step checkpoints, ``best`` for the best one) is then replaced atomically. Loading verifies the manifest and parses both files completely before
anything is applied, so a corrupt or truncated checkpoint raises :class:`CheckpointError` and
leaves the model, optimiser and method untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from mtlkit.core.contract import unwrap
from mtlkit.errors import CheckpointError

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A byte-reproducible safetensors file: the tensors in sorted order and one metadata entry
    (the Rust writer orders a multi-key metadata map differently in every process, so two
    identical runs would write files with different SHA-256)."""
    meta = json.dumps({"format": "mtlkit", "version": FORMAT_VERSION}, sort_keys=True)
    return save_safetensors(dict(sorted(tensors.items())), metadata={"mtlkit": meta})


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (tied tensors are stored once per name);
    the model inside a DDP or ``torch.compile`` wrapper, so the names do not depend on how it ran."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(model).state_dict().items()}


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, as tensors and plain values."""
    np_state: Any = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


@dataclass
class LoadedCheckpoint:
    """A fully parsed, verified checkpoint, not yet applied to anything."""

    path: Path
    model: dict[str, torch.Tensor]
    state: dict[str, Any]


def save_checkpoint(
    directory: Path,
    name: str,
    model: nn.Module,
    state: dict[str, Any],
    keep: int | None = None,
    pointer: str = LATEST,
) -> Path:
    """Write checkpoint ``directory/name`` atomically, then point ``directory/pointer`` at it.

    Args:
        keep: keep only the newest ``keep`` checkpoints sharing ``name``'s prefix (the part before
            the first ``-``); older ones are deleted after the new one is in place. ``None`` keeps all.
        pointer: the pointer file to update (``"latest"`` for step checkpoints, ``"best"``...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_bytes = safetensors_bytes(model_tensors(model))
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    state_bytes = buf.getvalue()
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {
            MODEL_FILE: {"bytes": len(model_bytes), "sha256": _sha256(model_bytes)},
            STATE_FILE: {"bytes": len(state_bytes), "sha256": _sha256(state_bytes)},
        },
    }
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{name}."))
    try:
        # Plain writes suffice inside the private temporary directory: it is renamed as a whole.
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        for fname, data in (
            (MODEL_FILE, model_bytes),
            (STATE_FILE, state_bytes),
            (MANIFEST_FILE, manifest_bytes),
        ):
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        final = directory / name
        old = None
        if final.exists():  # the same name written again (a resumed run): move the old one aside
            old = directory / f".{name}.old-{os.getpid()}"  # first, so a crash never leaves none
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory)
    atomic_write_bytes(directory / pointer, name.encode())
    if keep is not None:
        _prune(directory, name.split("-")[0], keep, current=name)
    return final


def _prune(directory: Path, prefix: str, keep: int, current: str) -> None:
    names = sorted(p.name for p in directory.glob(f"{prefix}-*") if p.is_dir())
    for old in names[: max(0, len(names) - keep)]:
        if old != current:
            shutil.rmtree(directory / old, ignore_errors=True)
    for stale in directory.glob(f".{prefix}-*"):  # temporary directories of a killed writer
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(directory: Path, pointer: str = LATEST) -> Path | None:
    """The checkpoint ``directory/pointer`` points to, or ``None`` when there is none."""
    pointer_file = Path(directory) / pointer
    if not pointer_file.exists():
        return None
    name = pointer_file.read_text().strip()
    path = Path(directory) / name
    if not name or "/" in name or name.startswith(".") or not path.is_dir():
        raise CheckpointError(f"{pointer_file} points to {name!r}, which is not a checkpoint directory.")
    return path


def resumable_checkpoint(
    directory: Path, pointer: str = LATEST
) -> tuple[LoadedCheckpoint | None, str | None]:
    """The checkpoint to resume from: the one ``pointer`` names when it is intact, else the newest
    intact one of the same kind, with a warning that names both; ``(None, None)`` when there is
    none. Raises :class:`CheckpointError` when checkpoints exist but none is intact."""
    directory = Path(directory)
    prefix = "best" if pointer == "best" else "step"
    candidates = sorted((p for p in directory.glob(f"{prefix}-*") if p.is_dir()), reverse=True)
    named: Path | None = None
    problem = None
    try:
        named = latest_checkpoint(directory, pointer)
    except CheckpointError as exc:
        problem = str(exc)
    if named is not None:
        try:
            return load_checkpoint(named), None
        except CheckpointError as exc:
            problem = str(exc)
    if named is None and problem is None and not candidates:
        return None, None
    for path in candidates:
        if named is not None and path == named:
            continue
        try:
            loaded = load_checkpoint(path)
        except CheckpointError:
            continue
        if problem is None:  # no pointer: a run killed between the rename and the pointer update
            return (
                loaded,
                f"{directory / pointer} is missing; resuming from the newest intact checkpoint {path}.",
            )
        return loaded, f"{problem} Resuming from the older intact checkpoint {path} instead."
    if problem is None:
        problem = f"{directory / pointer} is missing and no checkpoint in {directory} is intact."
    raise CheckpointError(
        f"{problem} No other intact checkpoint is in {directory}: delete it (or use another output "
        "directory) to start afresh."
    )


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read and verify a checkpoint completely; raise :class:`CheckpointError` on any defect."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError("'files' is not a mapping of file records")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"Checkpoint {path} has no readable manifest ({exc}); it is incomplete or corrupt."
        ) from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format {manifest.get('format_version')}, expected {FORMAT_VERSION}."
        )
    blobs = {}
    for fname in (MODEL_FILE, STATE_FILE):
        try:
            data = (path / fname).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"Checkpoint {path} is missing {fname}.") from exc
        expected = files.get(fname, {})
        if len(data) != expected.get("bytes") or _sha256(data) != expected.get("sha256"):
            raise CheckpointError(
                f"Checkpoint file {path / fname} is corrupt or truncated ({len(data)} bytes, "
                f"manifest says {expected.get('bytes')}); nothing was loaded."
            )
        blobs[fname] = data
    try:
        model = load_safetensors(blobs[MODEL_FILE])
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path / MODEL_FILE} is not a valid safetensors file: {exc}") from exc
    try:
        state = torch.load(io.BytesIO(blobs[STATE_FILE]), map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler raises several types
        raise CheckpointError(f"{path / STATE_FILE} cannot be read as weights-only data: {exc}") from exc
    return LoadedCheckpoint(path, model, state)


def apply_model_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: Path | str = "checkpoint"
) -> None:
    """Load tensors into ``model`` (the model inside a DDP or compile wrapper) after checking names
    and shapes (all or nothing)."""
    model = unwrap(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad_shapes = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {bad_shapes[:5]}."
        )
    model.load_state_dict(tensors, strict=True)
