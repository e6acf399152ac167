"""Devices and mixed precision for the Trainer."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch

from mtlkit.errors import ConfigError

AmpMode = Literal[False, "bf16", "fp16"] | bool


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else must name a device."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device: {device!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', 'mps')."
        ) from exc


class Precision:
    """Autocast and, for float16, a GradScaler. ``amp``: ``False``, ``"bf16"``, ``"fp16"``, or
    ``True`` (fp16 on CUDA, bf16 elsewhere)."""

    def __init__(self, amp: AmpMode, device: torch.device) -> None:
        self.device = device
        self.dtype: torch.dtype | None = None
        self.scaler: Any = None
        if amp is False or amp is None:
            return
        if amp is True:
            amp = "fp16" if device.type == "cuda" else "bf16"
        if amp == "bf16":
            self.dtype = torch.bfloat16
        elif amp == "fp16":
            self.dtype = torch.float16
            self.scaler = torch.amp.GradScaler(device.type)
        else:
            raise ConfigError(f"amp must be False, True, 'bf16' or 'fp16', got {amp!r}.")

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
