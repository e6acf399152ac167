"""How the estimators receive their tasks: a task-id column inside ``X`` (scikit-learn's tools, from
``cross_val_score`` to ``GridSearchCV``, then work unchanged) or a list of ``(X, y)`` per task
(:func:`stack_tasks` turns it into the first form)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]


def stack_tasks(tasks: Sequence[tuple[ArrayLike, ArrayLike]]) -> tuple[Array, NDArray]:
    """``[(X_0, y_0), (X_1, y_1), ...]`` as one ``X`` whose last column is the task id (0, 1, ...)
    and one ``y``: the form every estimator here takes with ``task_column=-1`` (the default)."""
    if len(tasks) == 0:
        raise ValueError("stack_tasks got no tasks.")
    blocks, targets = [], []
    width = None
    for t, (x, y) in enumerate(tasks):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise ValueError(
                f"task {t}: need a non-empty 2-D X and a 1-D y of the same length; got X {x.shape}, y {y.shape}."
            )
        if width is not None and x.shape[1] != width:
            raise ValueError(f"task {t} has {x.shape[1]} features, task 0 has {width}.")
        width = x.shape[1]
        blocks.append(np.column_stack([x, np.full(len(x), float(t))]))
        targets.append(y)
    return np.vstack(blocks), np.concatenate(targets)


def task_index(n_columns: int, task_column: int | None) -> int | None:
    """The task column's position in ``range(n_columns)``, or ``None`` for one task."""
    if task_column is None:
        return None
    if not isinstance(task_column, int | np.integer) or not -n_columns <= task_column < n_columns:
        raise ValueError(f"task_column={task_column!r} is not a column of X, which has {n_columns} columns.")
    if n_columns < 2:
        raise ValueError("X holds only the task column: it needs at least one feature besides it.")
    return int(task_column) % n_columns


def split_tasks(x: Array, task_column: int | None) -> tuple[Array, NDArray[np.float64]]:
    """The features (``X`` without the task column) and each row's task id (all 0 without one).
    Task ids must be whole numbers (a float column from ``np.column_stack`` is fine)."""
    column = task_index(x.shape[1], task_column)
    if column is None:
        return x, np.zeros(len(x))
    ids = x[:, column]
    if not np.all(ids == np.round(ids)):
        raise ValueError(
            f"the task column (column {column}) must hold whole-number task ids; got e.g. "
            f"{ids[ids != np.round(ids)][:3].tolist()} (is task_column pointing at a feature?)."
        )
    return np.delete(x, column, axis=1), ids


def task_positions(ids: NDArray[np.float64], tasks: NDArray[np.float64]) -> NDArray[np.intp]:
    """Each row's position in the fitted ``tasks`` (sorted ids); an id not seen in fit is an error."""
    positions = np.searchsorted(tasks, ids)
    inside = positions < len(tasks)
    known = inside.copy()
    known[inside] = tasks[positions[inside]] == ids[inside]
    if not known.all():
        unseen = np.unique(ids[~known])[:5].tolist()
        raise ValueError(f"task ids {unseen} were not seen in fit (fitted tasks: {tasks[:10].tolist()}...).")
    return positions
