"""Formatting shared by the benchmark reports."""

from __future__ import annotations

import statistics


def mean_sd(values: list[float], fmt: str = ".4f") -> str:
    """``mean ± sd`` over seeds (sd 0 for one value); a leading ``+`` in ``fmt`` signs the mean only."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt.lstrip('+')}}"
