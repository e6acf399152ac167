"""Synthetic multi-task problems with a known answer, for the estimators' tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mtlkit.estimators.tasks import Array, stack_tasks


@dataclass(frozen=True)
class RandomFourierFunction:
    """A smooth random function ``f(x) = sqrt(2 / N) sum_j a_j cos(w_j . x / l + b_j)`` (``N``
    random Fourier features of a Gaussian kernel of length ``l``: a draw close to a Gaussian
    process), as R-MTGB's synthetic generator builds its task functions."""

    weights: Array  # (N, d)
    phases: Array  # (N,)
    amplitudes: Array  # (N,)
    length: float

    @classmethod
    def draw(cls, rng: np.random.Generator, dims: int, features: int = 500, length_scale: float = 0.25):
        return cls(
            rng.standard_normal((features, dims)),
            rng.uniform(0, 2 * np.pi, features),
            rng.standard_normal(features),
            length_scale * dims,  # smoother in more dimensions, as the official generator
        )

    def __call__(self, x: Array) -> Array:
        features = np.cos(x @ self.weights.T / self.length + self.phases)
        return np.sqrt(2.0 / len(self.amplitudes)) * features @ self.amplitudes


def outlier_task_problem(
    n_tasks: int = 10,
    n_outliers: int = 2,
    n_features: int = 5,
    n_samples: int = 400,
    classification: bool = False,
    seed: int = 0,
) -> tuple[Array, NDArray, NDArray[np.intp]]:
    """R-MTGB's scenario 4 ("robust multi-task learning is optimal"), rebuilt from its description:
    every task is ``0.9 g(x) + 0.1 f_t(x)`` with its own random function ``f_t``; the regular tasks
    share one common function ``g``, the last ``n_outliers`` tasks another. Inputs uniform on
    ``[-1, 1]^d``; classification takes the sign, each task redrawn until its minority class holds
    at least 10% (as the official generator). Returns ``X`` (task id in the last column), ``y`` and
    the outlier tasks' ids."""
    if not 0 <= n_outliers < n_tasks:
        raise ValueError(f"need 0 <= n_outliers < n_tasks, got {n_outliers} and {n_tasks}.")
    rng = np.random.default_rng(seed)
    regular, odd = (RandomFourierFunction.draw(rng, n_features) for _ in range(2))
    tasks = []
    for t in range(n_tasks):
        common = odd if t >= n_tasks - n_outliers else regular
        while True:
            own = RandomFourierFunction.draw(rng, n_features)
            x = rng.uniform(-1, 1, (n_samples, n_features))
            y = 0.9 * common(x) + 0.1 * own(x)
            if not classification:
                break
            y = np.where(y >= 0, 1, -1)
            if min((y == 1).mean(), (y == -1).mean()) >= 0.1:
                break
        tasks.append((x, y))
    features, targets = stack_tasks(tasks)
    return features, targets, np.arange(n_tasks - n_outliers, n_tasks)


def block_task_problem(
    n_samples: int = 40, n_features: int = 20, n_tasks: int = 6, noise: float = 1.0, seed: int = 0
) -> tuple[Array, Array, Array, NDArray[np.bool_]]:
    """Linear tasks whose true coefficients form two feature-task blocks: the first half of the
    features drives only the first half of the tasks, the second half only the rest (coefficients
    N(0, 1)); inputs N(0, I), Gaussian noise of sd ``noise``. Returns ``X`` (task id in the last
    column), ``y``, the true ``W`` (features x tasks) and its block mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((n_features, n_tasks), dtype=bool)
    mask[: n_features // 2, : n_tasks // 2] = True
    mask[n_features // 2 :, n_tasks // 2 :] = True
    weights = np.where(mask, rng.standard_normal(mask.shape), 0.0)
    tasks = []
    for t in range(n_tasks):
        x = rng.standard_normal((n_samples, n_features))
        tasks.append((x, x @ weights[:, t] + noise * rng.standard_normal(n_samples)))
    features, targets = stack_tasks(tasks)
    return features, targets, weights, mask


def joint_selection_problem(
    n_regression: int = 10,
    n_classification: int = 10,
    n_features: int = 200,
    n_relevant: int = 20,
    n_samples: int = 100,
    noise: float = 0.5,
    seed: int = 0,
) -> tuple[Array, Array, Array, NDArray[np.intp]]:
    """MTLComb's tutorial simulation: every task has its own inputs N(0, I) and coefficients
    N(0, 1) on the same ``n_relevant`` features (the last ones, as the tutorial's indexing leaves
    them) and 0 elsewhere; regression targets with Gaussian noise of sd ``noise``, classification
    targets the sign of the noisy regression. Returns ``X`` (task id in the last column: regression
    tasks first), ``y``, the true ``W`` and the classification tasks' ids."""
    rng = np.random.default_rng(seed)
    count = n_regression + n_classification
    weights = np.zeros((n_features, count))
    weights[n_features - n_relevant :] = rng.standard_normal((n_relevant, count))
    tasks = []
    for t in range(count):
        x = rng.standard_normal((n_samples, n_features))
        y = x @ weights[:, t] + noise * rng.standard_normal(n_samples)
        tasks.append((x, np.sign(y) if t >= n_regression else y))
    features, targets = stack_tasks(tasks)
    return features, targets, weights, np.arange(n_regression, count)
