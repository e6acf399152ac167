"""Quality of a trade-off front: dominance, hypervolume, inverted generational distance, spacing.

Every function takes a front as an ``(n, m)`` array of objective values, ``n`` points of ``m``
objectives, all to be **minimised** (pass ``-accuracy``, or use ``maximize=``, for a metric where
higher is better). Inputs are checked: a non-finite value, a ragged or empty front or a reference of
the wrong length is a :class:`~mtlkit.errors.ConfigError`, never a silent NaN.

- :func:`non_dominated`: the mask of points no other point dominates (Pareto dominance: no worse in
  every objective and better in one).
- :func:`hypervolume`: the Lebesgue measure of the region the front dominates and the reference
  point bounds (Zitzler & Thiele, PPSN 1998). Exact: a sweep for two objectives and the WFG
  recursion of exclusive hypervolumes over limit sets (While, Bradstreet & Barone, IEEE TEVC 2012)
  for more. Points that do not strictly dominate the reference add nothing.
- :func:`igd` and :func:`igd_plus`: the mean distance from each point of a reference front to the
  nearest point of the front (Coello & Cruz Cortés 2005), and its dominance-aware, weakly
  Pareto-compliant variant (Ishibuchi et al., EMO 2015).
- :func:`spacing`: Schott's spread of the gaps between neighbouring points (0 for even spacing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mtlkit.errors import ConfigError

Front = NDArray[np.float64]


def as_front(points: ArrayLike, maximize: Sequence[bool] | None = None, name: str = "front") -> Front:
    """``points`` as a float64 ``(n, m)`` minimisation front (columns with ``maximize`` negated)."""
    front = np.array(points, dtype=np.float64)
    if front.ndim == 1 and front.size:
        front = front[None, :]
    if front.ndim != 2 or front.shape[0] == 0 or front.shape[1] == 0:
        raise ConfigError(
            f"{name}: need an (n, m) array of n >= 1 points and m >= 1 objectives, got shape {front.shape}."
        )
    if not np.isfinite(front).all():
        raise ConfigError(f"{name}: every objective value must be finite.")
    if maximize is not None:
        if len(maximize) != front.shape[1]:
            raise ConfigError(
                f"{name}: maximize has {len(maximize)} entries for {front.shape[1]} objectives."
            )
        front[:, np.asarray(maximize, dtype=bool)] *= -1.0
    return front


def _reference(reference: ArrayLike, m: int, maximize: Sequence[bool] | None) -> Front:
    ref = np.array(reference, dtype=np.float64).reshape(-1)
    if ref.shape != (m,) or not np.isfinite(ref).all():
        raise ConfigError(f"reference: need {m} finite values, got {np.asarray(reference).tolist()}.")
    if maximize is not None:
        ref[np.asarray(maximize, dtype=bool)] *= -1.0
    return ref


def dominates(p: ArrayLike, q: ArrayLike) -> bool:
    """``p`` Pareto-dominates ``q`` (minimisation): no worse anywhere and better somewhere."""
    a, b = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated(points: ArrayLike, maximize: Sequence[bool] | None = None) -> NDArray[np.bool_]:
    """Mask of the points that no other point dominates; duplicates of a non-dominated point are
    all kept."""
    front = as_front(points, maximize)
    no_worse = (front[:, None, :] <= front[None, :, :]).all(axis=2)  # [i, j]: i is no worse than j
    better = (front[:, None, :] < front[None, :, :]).any(axis=2)
    dominated = np.asarray((no_worse & better).any(axis=0), dtype=bool)
    return np.asarray(~dominated, dtype=bool)


def _hv2(front: Front, ref: Front) -> float:
    """Two objectives: sort by the first and add the rectangles each point adds below the last."""
    order = np.argsort(front[:, 0], kind="stable")
    volume, best_second = 0.0, ref[1]
    for x, y in front[order]:
        if y < best_second:
            volume += (ref[0] - x) * (best_second - y)
            best_second = y
    return volume


def _hv(front: Front, ref: Front) -> float:
    """WFG: the hypervolume of a front of points that all strictly dominate ``ref``."""
    n, m = front.shape
    if n == 0:
        return 0.0
    if n == 1:
        return float(np.prod(ref - front[0]))
    if m == 2:
        return _hv2(front, ref)
    # sorting on the last objective (worst first) keeps limit sets small
    front = front[np.argsort(-front[:, -1], kind="stable")]
    volume = 0.0
    for k in range(n):
        point = front[k]
        inclusive = float(np.prod(ref - point))
        rest = front[k + 1 :]
        if len(rest):
            limited = np.maximum(rest, point)  # the part of each later point's box inside point's box
            limited = limited[non_dominated(limited)]
            limited = np.unique(limited, axis=0)
            inclusive -= _hv(limited, ref)
        volume += inclusive
    return volume


def hypervolume(points: ArrayLike, reference: ArrayLike, maximize: Sequence[bool] | None = None) -> float:
    """Hypervolume of the front with respect to ``reference`` (minimisation; a larger front is
    better). Exact in any number of objectives; the cost grows steeply with the number of
    objectives (WFG). Fronts of mutually non-dominated points on a sphere, one thread: 1,000 points
    in 2 objectives 0.06 s, 200 in 3 0.19 s, 100 in 4 0.17 s, 100 in 5 1.3 s."""
    front = as_front(points, maximize)
    ref = _reference(reference, front.shape[1], maximize)
    inside = front[(front < ref).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    inside = np.unique(inside[non_dominated(inside)], axis=0)
    return _hv(inside, ref)


def igd(points: ArrayLike, reference_front: ArrayLike, maximize: Sequence[bool] | None = None) -> float:
    """Inverted generational distance: the mean Euclidean distance from each reference point to the
    nearest point of the front (lower is better; 0 when the front contains the reference front)."""
    front, target = as_front(points, maximize), as_front(reference_front, maximize, "reference_front")
    if front.shape[1] != target.shape[1]:
        raise ConfigError(f"igd: the fronts have {front.shape[1]} and {target.shape[1]} objectives.")
    gaps = np.linalg.norm(target[:, None, :] - front[None, :, :], axis=2)
    return float(gaps.min(axis=1).mean())


def igd_plus(points: ArrayLike, reference_front: ArrayLike, maximize: Sequence[bool] | None = None) -> float:
    """IGD+: as :func:`igd`, but a front point counts only the amounts by which it is worse than the
    reference point (``max(a - z, 0)``), so a front that dominates the reference front scores 0."""
    front, target = as_front(points, maximize), as_front(reference_front, maximize, "reference_front")
    if front.shape[1] != target.shape[1]:
        raise ConfigError(f"igd_plus: the fronts have {front.shape[1]} and {target.shape[1]} objectives.")
    worse = np.maximum(front[None, :, :] - target[:, None, :], 0.0)
    return float(np.linalg.norm(worse, axis=2).min(axis=1).mean())


def spacing(points: ArrayLike, maximize: Sequence[bool] | None = None) -> float:
    """Schott's spacing: the standard deviation of each point's L1 distance to its nearest
    neighbour (0 for an evenly spaced front; needs two points)."""
    front = as_front(points, maximize)
    if len(front) < 2:
        raise ConfigError("spacing: needs at least two points.")
    gaps = np.abs(front[:, None, :] - front[None, :, :]).sum(axis=2)
    np.fill_diagonal(gaps, np.inf)
    nearest = gaps.min(axis=1)
    return float(np.sqrt(((nearest - nearest.mean()) ** 2).sum() / (len(front) - 1)))
