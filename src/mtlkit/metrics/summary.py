"""Mean and 95% Student-t interval of a metric over seeds (``mean ± t_{0.975, n-1} s / sqrt(n)``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class Summary:
    """Mean and 95% interval half-width (NaN with one value) of a list of numbers."""

    mean: float
    half_width: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not vals:
            return cls(math.nan, math.nan, 0)
        if len(vals) == 1:
            return cls(vals[0], math.nan, 1)
        sd = statistics.stdev(vals)
        return cls(statistics.fmean(vals), t_quantile(len(vals) - 1) * sd / math.sqrt(len(vals)), len(vals))

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def text(self, digits: int) -> str:
        if math.isnan(self.mean):
            return "—"
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"
