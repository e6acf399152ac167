"""Formatting and writing shared by the benchmark reports."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def mean_sd(values: list[float], fmt: str = ".4f") -> str:
    """``mean ± sd`` over seeds (sd 0 for one value); a leading ``+`` in ``fmt`` signs the mean only."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt.lstrip('+')}}"


def write_results(out: Path, text: str, data: Any) -> None:
    """Write a benchmark's markdown report to ``out``, its data beside it as JSON, and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(text)
