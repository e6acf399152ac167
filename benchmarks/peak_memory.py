"""Wall time and peak resident memory of one call, inside a running process (Linux), for the
merging benchmarks."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MMAP_THRESHOLD = "65536"


def fix_mmap_threshold() -> None:
    """Restart this script with ``MALLOC_MMAP_THRESHOLD_`` fixed (glibc reads it only at start),
    so that freed tensors leave the process at once and every call is measured from the same
    floor. Call it before importing torch."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(
            sys.executable,
            [sys.executable, *sys.argv],
            {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD},
        )


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB
    raise RuntimeError(key)


def measured(run: Callable[[], Any]) -> tuple[Any, float, float]:
    """``run()``'s value, wall seconds, and peak resident MiB above the start."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    base = _status("VmRSS")
    start = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - start
    return value, seconds, (_status("VmHWM") - base) / 1024
