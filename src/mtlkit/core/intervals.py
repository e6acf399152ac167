"""Interval clustering: split the timesteps ``0..T-1`` into ``k`` contiguous intervals of minimum
total cost by dynamic programming (ANT; Go, Kim, Lee, Lee, Oh, Moon, Choi, "Addressing Negative
Transfer in Diffusion Models", NeurIPS 2023).

Three interval costs, as in the official code's clustering utility:

- ``uniform_intervals``: equal lengths (what the official training scripts use);
- ``snr_cost``: ``sum_{s=l..r} |SNR(s) - SNR(c)|`` with ``c = (l + r + 1) // 2`` the interval's
  centre;
- ``affinity_cost``: ``-sum_{s=l..r} A[c, s]`` for a task-affinity matrix ``A`` (gradient cosines
  between timesteps), so intervals group timesteps whose gradients agree with the centre's.

The dynamic programme is exact (``O(k T^2)`` with the costs precomputed as a ``T x T`` matrix in
``O(T^2)`` from prefix sums); invalid splits are masked explicitly, never by turning exact zeros
into infinities as the reference code does (which wrongly excludes zero-cost splits).
"""

from __future__ import annotations

import numpy as np

from mtlkit.errors import ConfigError

Interval = tuple[int, int]


def uniform_intervals(num_steps: int, k: int) -> list[Interval]:
    """``k`` contiguous intervals of (nearly) equal length covering ``0..num_steps-1``."""
    _check(num_steps, k)
    edges = [round(j * num_steps / k) for j in range(k + 1)]
    return [(edges[j], edges[j + 1] - 1) for j in range(k)]


def snr_cost(snr: np.ndarray) -> np.ndarray:
    """The ``T x T`` matrix of SNR interval costs (entry ``[l, r]`` for ``l <= r``; ``inf`` below
    the diagonal). Exact for any curve: prefix sums when the SNR is monotone (every noise
    schedule), a direct sum otherwise (small ``T`` only)."""
    snr = np.asarray(snr, dtype=np.float64)
    t = len(snr)
    lo, hi = np.triu_indices(t)
    centre = (lo + hi + 1) // 2
    cost = np.full((t, t), np.inf)
    diffs = np.diff(snr)
    if np.all(diffs <= 0) or np.all(diffs >= 0):
        sign = 1.0 if np.all(diffs <= 0) else -1.0
        prefix = np.concatenate([[0.0], np.cumsum(snr)])
        s_c = snr[centre]
        left = (prefix[centre + 1] - prefix[lo]) - (centre - lo + 1) * s_c  # s in [l, c]
        right = (hi - centre) * s_c - (prefix[hi + 1] - prefix[centre + 1])  # s in (c, r]
        cost[lo, hi] = sign * (left + right)
    else:
        if t > 2000:
            raise ConfigError(
                "A non-monotone SNR curve longer than 2000 steps is too slow to cluster exactly."
            )
        for a, b, c in zip(lo, hi, centre, strict=True):
            cost[a, b] = np.abs(snr[a : b + 1] - snr[c]).sum()
    return np.maximum(cost, 0.0)  # rounding of the prefix sums must not make a cost negative


def affinity_cost(affinity: np.ndarray) -> np.ndarray:
    """The ``T x T`` matrix of task-affinity interval costs ``-sum_{s=l..r} A[c, s]``."""
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ConfigError(f"The affinity matrix must be square, got shape {a.shape}.")
    t = a.shape[0]
    rows = np.concatenate([np.zeros((t, 1)), np.cumsum(a, axis=1)], axis=1)
    lo, hi = np.triu_indices(t)
    centre = (lo + hi + 1) // 2
    cost = np.full((t, t), np.inf)
    cost[lo, hi] = -(rows[centre, hi + 1] - rows[centre, lo])
    return cost


def cluster_intervals(cost: np.ndarray, k: int) -> tuple[list[Interval], float]:
    """The partition of ``0..T-1`` into ``k`` contiguous intervals minimising the summed cost, and
    that cost. ``cost[l, r]`` is the cost of the interval ``[l, r]``."""
    cost = np.asarray(cost, dtype=np.float64)
    t = cost.shape[0]
    _check(t, k)
    if cost.shape != (t, t):
        raise ConfigError(f"The cost matrix must be T x T, got {cost.shape}.")
    if np.isnan(cost[np.triu_indices(t)]).any():
        raise ConfigError("The interval costs contain NaN.")
    best = np.full((t, k), np.inf)  # best[i, j]: timesteps 0..i in j + 1 intervals
    back = np.zeros((t, k), dtype=np.int64)
    best[:, 0] = cost[0, :]
    for j in range(1, k):
        for i in range(j, t):
            split = np.arange(j - 1, i)  # the previous intervals end at `split`
            total = best[split, j - 1] + cost[split + 1, i]
            pick = int(np.argmin(total))
            best[i, j], back[i, j] = total[pick], split[pick]
    intervals: list[Interval] = []
    end = t - 1
    for j in range(k - 1, 0, -1):
        start = int(back[end, j]) + 1
        intervals.append((start, end))
        end = start - 1
    intervals.append((0, end))
    return intervals[::-1], float(best[t - 1, k - 1])


def _check(num_steps: int, k: int) -> None:
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= num_steps):
        raise ConfigError(f"k must be an integer in [1, {num_steps}] (one interval per cluster), got {k!r}.")
