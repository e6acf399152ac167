"""MTLComb: joint feature selection across regression and classification tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.special import expit, log_expit
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from mtlkit.estimators.tasks import Array, split_tasks, task_positions

#: the loss weights that line the two task types' regularisation paths up: at W = 0 the gradient
#: of 0.5 * mean squared error is -X^T y / n and that of 2 * mean logistic loss is -X^T y / n too
REGRESSION_WEIGHT, CLASSIFICATION_WEIGHT = 0.5, 2.0


@dataclass
class Problem:
    """The tasks' data, as each task's rows: features, targets (+-1 for classification) and type."""

    features: list[Array]
    targets: list[Array]
    classification: np.ndarray  # (T,) bool
    ridge: float = 0.0
    mean_reg: float = 0.0
    intercept: bool = True

    @property
    def width(self) -> int:
        return self.features[0].shape[1]

    def loss(self, w: Array, b: Array) -> float:
        """The smooth part: the weighted task losses and the two quadratic penalties."""
        total = 0.0
        for t, (x, y) in enumerate(zip(self.features, self.targets, strict=True)):
            margin = x @ w[:, t] + b[t]
            if self.classification[t]:
                total += CLASSIFICATION_WEIGHT * float(np.mean(-log_expit(y * margin)))
            else:
                total += REGRESSION_WEIGHT * float(np.mean((y - margin) ** 2))
        return (
            total
            + self.ridge * float((w**2).sum())
            + self.mean_reg * float(((w - w.mean(1, keepdims=True)) ** 2).sum())
        )

    def gradient(self, w: Array, b: Array) -> tuple[Array, Array]:
        gw, gb = np.zeros_like(w), np.zeros_like(b)
        for t, (x, y) in enumerate(zip(self.features, self.targets, strict=True)):
            margin = x @ w[:, t] + b[t]
            if self.classification[t]:
                r = -CLASSIFICATION_WEIGHT * y * expit(-y * margin) / len(y)
            else:
                r = -2 * REGRESSION_WEIGHT * (y - margin) / len(y)
            gw[:, t] = x.T @ r
            gb[t] = r.sum() if self.intercept else 0.0
        gw += 2 * self.ridge * w + 2 * self.mean_reg * (w - w.mean(1, keepdims=True))
        return gw, gb

    def null_intercepts(self) -> Array:
        """The intercepts that minimise the loss at W = 0 (zeros without intercepts)."""
        if not self.intercept:
            return np.zeros(len(self.targets))
        out = []
        for y, is_cls in zip(self.targets, self.classification, strict=True):
            if is_cls:
                p = float(np.mean(y > 0))
                if p in (0.0, 1.0):
                    raise ValueError(
                        "a classification task's rows hold one class only: its intercept is infinite."
                    )
                out.append(np.log(p / (1 - p)))
            else:
                out.append(float(np.mean(y)))
        return np.array(out)

    def lambda_max(self) -> float:
        """The smallest penalty at which ``W = 0`` is optimal: the largest row norm of the loss
        gradient at ``W = 0`` (with the intercepts at their optimum); the same formula for both task
        types thanks to the loss weights."""
        w = np.zeros((self.width, len(self.targets)))
        gw, _ = self.gradient(w, self.null_intercepts())
        return float(np.sqrt((gw**2).sum(1)).max())


def group_soft_threshold(w: Array, threshold: float) -> Array:
    """The proximal map of ``threshold * sum_j ||w[j, :]||_2``: each row shrunk towards 0 by
    ``threshold`` in norm, and set to 0 when its norm is below it."""
    norms = np.sqrt((w**2).sum(1, keepdims=True))
    scale = np.where(norms > threshold, 1 - threshold / np.where(norms > 0, norms, 1.0), 0.0)
    return w * scale


@dataclass
class Solution:
    coef: Array  # (p, T)
    intercept: Array  # (T,)
    objective: list[float] = field(default_factory=list)
    lipschitz: float = 1.0
    iterations: int = 0


def solve(
    problem: Problem,
    lam: float,
    start: tuple[Array, Array] | None = None,
    max_iter: int = 20,
    tol: float = 0.01,
    lipschitz: float = 1.0,
) -> Solution:
    """Accelerated proximal gradient (FISTA) with the official code's backtracking: the step's
    inverse ``gamma`` starts at ``lipschitz`` and doubles until the quadratic upper bound holds;
    stop when the objective changes by at most ``tol`` times its last value, or the step is below
    1e-20 in squared norm."""
    w = start[0].copy() if start is not None else np.zeros((problem.width, len(problem.targets)))
    b = start[1].copy() if start is not None else problem.null_intercepts()
    w_old, b_old = w.copy(), b.copy()
    t, t_old, gamma = 1.0, 0.0, lipschitz
    history: list[float] = []
    iteration = 0
    while iteration < max_iter:
        alpha = (t_old - 1) / t
        sw, sb = (1 + alpha) * w - alpha * w_old, (1 + alpha) * b - alpha * b_old
        gw, gb = problem.gradient(sw, sb)
        f_search = problem.loss(sw, sb)
        stalled = False
        while True:
            cw = group_soft_threshold(sw - gw / gamma, lam / gamma)
            cb = sb - gb / gamma
            dw, db = cw - sw, cb - sb
            step = float((dw**2).sum() + (db**2).sum())
            f_candidate = problem.loss(cw, cb)
            if step <= 1e-20:
                stalled = True
                break
            if f_candidate <= f_search + float((dw * gw).sum() + (db * gb).sum()) + gamma * step / 2:
                break
            gamma *= 2
            if not (np.isfinite(f_search) and gamma < 1e300):
                raise FloatingPointError(
                    "MTLComb's line search found no step (a non-finite loss or gradient: a classification "
                    "task with one class?); nothing was fitted."
                )
        w_old, b_old, w, b = w, b, cw, cb
        history.append(f_candidate + lam * float(np.sqrt((w**2).sum(1)).sum()))
        iteration += 1
        if stalled:
            break
        if len(history) >= 2 and abs(history[-1] - history[-2]) <= tol * abs(history[-2]):
            break
        t_old, t = t, 0.5 * (1 + np.sqrt(1 + 4 * t * t))
    return Solution(w, b, history, gamma, iteration)


def lambda_path(lambda_max: float, count: int, ratio: float, end: float | None = None) -> Array:
    """``count`` log-spaced penalties from ``lambda_max`` down to ``end`` (default ``ratio *
    lambda_max``); ``end`` alone when it is at least ``lambda_max`` (the solution there is 0)."""
    low = ratio * lambda_max if end is None else end
    if not low > 0:
        raise ValueError(f"the penalty must be > 0, got {low:.4g}.")
    if low >= lambda_max or count == 1:
        return np.array([low])
    path = np.geomspace(lambda_max, low, count)
    path[0], path[-1] = lambda_max, low  # exactly: exp(log(x)) may fall below x and let a feature in
    return path


class MTLComb(RegressorMixin, BaseEstimator):
    """MTLComb (Cao, Rajan, Hahn, Kocak, Durstewitz, Schwarz, Schneider-Lindner, "Multi-task
    learning for the joint feature selection of regression and classification tasks", Scientific
    Reports, 2026; arXiv 2405.09886): one coefficient column per task, regression and
    classification tasks side by side, and features selected jointly by the group lasso over the
    tasks:

        min_W  sum_reg 0.5 mean (y - X w_t - b_t)^2 + sum_cls 2 mean log(1 + exp(-y (X w_t + b_t)))
               + ridge ||W||_F^2 + mean_reg sum_t ||w_t - mean_t w_t||^2 + lam sum_j ||W[j, :]||_2.

    The weights 0.5 and 2 make both losses' gradients at ``W = 0`` equal to ``-X^T y / n``, so one
    penalty path (from ``lambda_max_``, the largest row norm of that gradient, down to
    ``lambda_ratio`` times it, ``n_lambdas`` log-spaced values, warm-started) selects features for
    both task types alike. Solver: FISTA with backtracking (:func:`solve`), the official defaults
    (20 iterations per penalty, stop at a relative change of 0.01). ``lam``: the penalty to fit
    (``None``: the path's end); the path runs from ``lambda_max_`` down to it, as the official
    ``MTLComb_Train`` with one ``lambda``.

    Where we depart from the official R code (transbioZI/MTLComb): intercepts are unpenalised
    per-task offsets (``fit_intercept``; the official code puts a column of ones inside the group
    penalty, or has none), and ``lambda_max_`` is taken at their optimum. The quadratic terms are
    written without halves: ``ridge ||W||_F^2`` is the R package's ``C ||W||_F^2`` in its
    ``solve_L21`` (the paper's ``(C2 / 2) ||W||_F^2``: ``ridge = C2 / 2``) and ``mean_reg`` the
    paper's mean regularisation ``(C / 2) ||W G||_F^2`` (``mean_reg = C / 2``).
    Classification tasks take two distinct labels each (the larger is +1). Features should be
    standardised first (``lambda_max_`` depends on their scale).

    Tasks: ``task_column`` is the column of ``X`` holding each row's task id (default the last;
    ``None``: one task); ``classification_tasks`` lists the ids of the classification tasks.
    ``predict`` gives a value for a regression task's row and a label for a classification task's;
    ``score`` is the mean over tasks of R^2 (regression) and accuracy (classification).
    """

    def __init__(
        self,
        lam: float | None = None,
        *,
        classification_tasks: Sequence[float] = (),
        n_lambdas: int = 10,
        lambda_ratio: float = 0.01,
        ridge: float = 0.0,
        mean_reg: float = 0.0,
        fit_intercept: bool = True,
        max_iter: int = 20,
        tol: float = 0.01,
        task_column: int | None = -1,
    ) -> None:
        self.lam = lam
        self.classification_tasks = classification_tasks
        self.n_lambdas = n_lambdas
        self.lambda_ratio = lambda_ratio
        self.ridge = ridge
        self.mean_reg = mean_reg
        self.fit_intercept = fit_intercept
        self.max_iter = max_iter
        self.tol = tol
        self.task_column = task_column

    def _check_settings(self) -> None:
        if self.lam is not None and not self.lam > 0:
            raise ValueError(f"lam must be > 0 (or None for the path's end), got {self.lam}.")
        if not 0 < self.lambda_ratio < 1 or self.n_lambdas < 1:
            raise ValueError(
                f"need 0 < lambda_ratio < 1 and n_lambdas >= 1; got {self.lambda_ratio}, {self.n_lambdas}."
            )
        if self.ridge < 0 or self.mean_reg < 0 or self.max_iter < 1 or self.tol < 0:
            raise ValueError("ridge, mean_reg and tol must be >= 0 and max_iter >= 1.")

    def _problem(self, x: Array, y: Array, rows: np.ndarray) -> Problem:
        features, targets = [], []
        classification = np.array([labels is not None for labels in self.classes_])
        for r in range(len(self.tasks_)):
            idx = rows == r
            target = y[idx].astype(np.float64)
            labels = self.classes_[r]
            if labels is not None:
                target = np.where(target == labels[1], 1.0, -1.0)
            features.append(x[idx])
            targets.append(target)
        return Problem(features, targets, classification, self.ridge, self.mean_reg, self.fit_intercept)

    def _prepare(self, X: Any, y: Any) -> Problem:
        self._check_settings()
        x, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        features, ids = split_tasks(x, self.task_column)
        self.tasks_, rows = np.unique(ids, return_inverse=True)
        wanted = np.asarray(self.classification_tasks, dtype=np.float64)
        unknown = set(wanted.tolist()) - set(self.tasks_.tolist())
        if unknown:
            raise ValueError(
                f"classification_tasks {sorted(unknown)} are not among the tasks in y ({self.tasks_.tolist()})."
            )
        sizes = np.bincount(rows)
        if sizes.min() < 2:
            raise ValueError(
                f"task {self.tasks_[sizes.argmin()]:g} has 1 sample; MTLComb needs at least 2 samples per task."
            )
        self.classes_: list[Array | None] = []
        for r, task in enumerate(self.tasks_):
            if task in wanted:
                labels = np.unique(y[rows == r])
                if len(labels) != 2:
                    raise ValueError(
                        f"classification task {task:g} needs exactly 2 labels, got {labels.tolist()[:5]}."
                    )
                self.classes_.append(labels)
            else:
                self.classes_.append(None)
        return self._problem(features, y, rows)

    def _fit_path(self, problem: Problem, end: float | None) -> None:
        self.lambda_max_ = problem.lambda_max()
        if self.lambda_max_ == 0:  # W = 0 is optimal at every penalty (constant targets)
            zero, offsets = np.zeros((problem.width, len(problem.targets))), problem.null_intercepts()
            self.lambdas_ = np.array([end if end is not None else 0.0])
            self.path_coefs_, self.path_intercepts_ = zero.T[None].copy(), offsets[None].copy()
            self.coef_, self.intercept_ = zero.T.copy(), offsets
            self.objective_, self.n_iter_ = [problem.loss(zero, offsets)], 0
            return
        self.lambdas_ = lambda_path(self.lambda_max_, self.n_lambdas, self.lambda_ratio, end)
        start = None
        coefs, intercepts = [], []
        for lam in self.lambdas_:  # warm starts down the path; the step search restarts at 1
            solution = solve(problem, float(lam), start, self.max_iter, self.tol)
            start = (solution.coef, solution.intercept)
            coefs.append(solution.coef.T.copy())
            intercepts.append(solution.intercept.copy())
        self.path_coefs_, self.path_intercepts_ = np.stack(coefs), np.stack(intercepts)  # (L, T, p), (L, T)
        self.coef_, self.intercept_ = solution.coef.T.copy(), solution.intercept.copy()
        self.objective_, self.n_iter_ = solution.objective, solution.iterations

    def fit(self, X: Any, y: Any) -> MTLComb:
        problem = self._prepare(X, y)
        self._fit_path(problem, self.lam)
        return self

    @property
    def selected_features_(self) -> np.ndarray:
        """The indices of the features with a non-zero coefficient in some task."""
        check_is_fitted(self, "coef_")
        return np.flatnonzero(np.abs(self.coef_).sum(0) > 0)

    def _rows(self, X: Any) -> tuple[Array, np.ndarray]:
        check_is_fitted(self, "coef_")
        x = validate_data(self, X, dtype=np.float64, reset=False)
        features, ids = split_tasks(x, self.task_column)
        return features, task_positions(ids, self.tasks_)

    def linear_predictor(self, X: Any) -> Array:
        """Each row's ``x . w_t + b_t`` under its task's coefficients."""
        features, rows = self._rows(X)
        return np.einsum("ij,ij->i", features, self.coef_[rows]) + self.intercept_[rows]

    def _has_classification(self) -> bool:
        return len(self.classification_tasks) > 0

    @available_if(_has_classification)
    def decision_function(self, X: Any) -> Array:
        """The linear predictor (:meth:`linear_predictor`); offered with classification tasks."""
        return self.linear_predictor(X)

    def predict(self, X: Any) -> Array:
        margin = self.linear_predictor(X)
        _, rows = self._rows(X)
        out = margin.copy()
        for r, labels in enumerate(self.classes_):
            if labels is not None:
                idx = rows == r
                out[idx] = np.where(margin[idx] > 0, labels[1], labels[0])
        return out

    @available_if(_has_classification)
    def predict_proba(self, X: Any) -> Array:
        """``(n, 2)`` class probabilities (columns in each task's label order); rows of
        classification tasks only."""
        margin = self.linear_predictor(X)
        _, rows = self._rows(X)
        regression = [r for r in np.unique(rows) if self.classes_[r] is None]
        if regression:
            raise ValueError(
                f"rows of regression tasks {self.tasks_[regression].tolist()} have no class probabilities."
            )
        p = expit(margin)
        return np.column_stack([1 - p, p])

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """The mean over the tasks in ``X`` (with some weight) of R^2 (regression tasks) and accuracy
        (classification), each weighted by ``sample_weight`` within its task."""
        prediction = self.predict(X)
        _, rows = self._rows(X)
        y = np.asarray(y)
        weight = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        scores = []
        for r in np.unique(rows):
            idx = rows == r
            if not weight[idx].sum() > 0:
                continue  # a task without weight does not count
            if self.classes_[r] is None:
                scores.append(r2_score(y[idx], prediction[idx], sample_weight=weight[idx]))
            else:
                scores.append(float(np.average(y[idx] == prediction[idx], weights=weight[idx])))
        return float(np.mean(scores))


class MTLCombCV(MTLComb):
    """:class:`MTLComb` with the penalty chosen by the official cross-validation (``MTLComb_CV``):
    each task's rows shuffled (``random_state``) and dealt into ``cv`` folds; for each fold the path
    is fitted on the rest and scored on it, mean squared error averaged over the regression tasks
    and AUC over the classification tasks; the path's penalties are averaged over the folds;
    ``lambda_regression_`` minimises the mean error, ``lambda_classification_`` maximises the mean
    AUC, and the model is refitted on all the data at their mix weighted by the task counts
    (``lam_``). Official solver settings for cross-validation: 50 iterations, tolerance 0.001."""

    def __init__(
        self,
        *,
        classification_tasks: Sequence[float] = (),
        cv: int = 10,
        n_lambdas: int = 10,
        lambda_ratio: float = 0.01,
        ridge: float = 0.0,
        mean_reg: float = 0.0,
        fit_intercept: bool = True,
        max_iter: int = 50,
        tol: float = 0.001,
        task_column: int | None = -1,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        super().__init__(
            None,
            classification_tasks=classification_tasks,
            n_lambdas=n_lambdas,
            lambda_ratio=lambda_ratio,
            ridge=ridge,
            mean_reg=mean_reg,
            fit_intercept=fit_intercept,
            max_iter=max_iter,
            tol=tol,
            task_column=task_column,
        )
        self.cv = cv
        self.random_state = random_state

    def _deal(self, target: Array, classification: bool, rng: np.random.RandomState) -> np.ndarray:
        """Each row's fold: the task's rows shuffled and dealt in turn (the official partition);
        a classification task's classes dealt one after the other, so every fold's training part
        keeps both (the official partition can lose one, and a one-class task has no intercept)."""
        fold_of = np.empty(len(target), dtype=np.intp)
        groups = (
            [np.flatnonzero(target == c) for c in np.unique(target)]
            if classification
            else [np.arange(len(target))]
        )
        dealt = 0
        for rows in groups:
            if classification and len(rows) < 2:
                raise ValueError(
                    "MTLCombCV: a classification task has a class with one row; every training fold needs both classes."
                )
            fold_of[rng.permutation(rows)] = (dealt + np.arange(len(rows))) % self.cv
            dealt += len(rows)
        return fold_of

    def fit(self, X: Any, y: Any) -> MTLCombCV:
        if self.cv < 2:
            raise ValueError(f"cv must be >= 2, got {self.cv}.")
        problem = self._prepare(X, y)
        rng = check_random_state(self.random_state)
        folds = [
            self._deal(target, cls, rng)
            for target, cls in zip(problem.targets, problem.classification, strict=True)
        ]
        count = len(problem.targets)
        errors = np.full((self.cv, self.n_lambdas), np.nan)
        aucs = np.full((self.cv, self.n_lambdas), np.nan)
        lambdas = np.zeros((self.cv, self.n_lambdas))
        for fold in range(self.cv):
            held = [np.flatnonzero(of == fold) for of in folds]
            kept = [np.flatnonzero(of != fold) for of in folds]
            train = replace(
                problem,
                features=[problem.features[t][kept[t]] for t in range(count)],
                targets=[problem.targets[t][kept[t]] for t in range(count)],
            )
            part = MTLComb(
                n_lambdas=self.n_lambdas, lambda_ratio=self.lambda_ratio, max_iter=self.max_iter, tol=self.tol
            )
            part._fit_path(train, None)
            lambdas[fold] = part.lambdas_
            for k in range(self.n_lambdas):
                mse, auc = [], []
                for t in range(count):
                    if len(held[t]) == 0:
                        continue
                    x, target = problem.features[t][held[t]], problem.targets[t][held[t]]
                    margin = x @ part.path_coefs_[k, t] + part.path_intercepts_[k, t]
                    if problem.classification[t]:
                        if len(np.unique(target)) == 2:
                            auc.append(roc_auc_score(target, margin))
                    else:
                        mse.append(float(np.mean((target - margin) ** 2)))
                errors[fold, k] = np.mean(mse) if mse else np.nan
                aucs[fold, k] = np.mean(auc) if auc else np.nan
        self.cv_lambdas_ = lambdas.mean(0)
        self.cv_mse_, self.cv_auc_ = errors, aucs
        regression, classification = int((~problem.classification).sum()), int(problem.classification.sum())
        mix = 0.0
        if regression:
            self.lambda_regression_ = float(self.cv_lambdas_[np.nanargmin(np.nanmean(errors, 0))])
            mix += regression / count * self.lambda_regression_
        if classification:
            self.lambda_classification_ = float(self.cv_lambdas_[np.nanargmax(np.nanmean(aucs, 0))])
            mix += classification / count * self.lambda_classification_
        self.lam_ = mix
        self._fit_path(problem, min(mix, problem.lambda_max()))
        return self
