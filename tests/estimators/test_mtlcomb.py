"""MTLComb: the penalty's entry point (D4), the loss weights that line the task types up, the
solver against a conic solver (D5) and FISTA's rate, the tutorial's selection, cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlkit.estimators import MTLComb, MTLCombCV, joint_selection_problem, stack_tasks
from mtlkit.estimators.mtlcomb import Problem, solve


def _mixed(kind, seed=0, n=60, p=8):
    """Tasks from the same inputs' distribution with sign-consistent targets: regression only,
    classification only, or two of each."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(p)
    tasks, cls = [], []
    kinds = {"regression": "rrrr", "classification": "cccc", "mixed": "rrcc"}[kind]
    for t, k in enumerate(kinds):
        x = rng.standard_normal((n, p))
        y = x @ (w + 0.3 * rng.standard_normal(p)) + 0.5 * rng.standard_normal(n)
        if k == "c":
            y = np.sign(y)
            cls.append(t)
        tasks.append((x, y))
    x, y = stack_tasks(tasks)
    return x, y, tuple(cls)


@pytest.mark.parametrize("kind", ["regression", "classification", "mixed"])
@pytest.mark.parametrize("intercept", [True, False])
def test_d4_no_feature_at_lambda_max_and_exactly_the_argmax_row_just_below(kind, intercept):
    x, y, cls = _mixed(kind)
    model = MTLComb(classification_tasks=cls, fit_intercept=intercept, max_iter=2000, tol=1e-12)
    top = model.fit(x, y).lambda_max_
    at = MTLComb(top, classification_tasks=cls, fit_intercept=intercept).fit(x, y)
    assert np.count_nonzero(at.coef_) == 0
    assert (
        np.count_nonzero(
            MTLComb(1.5 * top, classification_tasks=cls, fit_intercept=intercept).fit(x, y).coef_
        )
        == 0
    )
    below = MTLComb(
        0.99 * top, classification_tasks=cls, fit_intercept=intercept, max_iter=5000, tol=1e-14
    ).fit(x, y)
    problem = below._prepare(x, y)
    gradient, _ = problem.gradient(np.zeros((8, 4)), problem.null_intercepts())
    assert below.selected_features_.tolist() == [int(np.argmax(np.linalg.norm(gradient, axis=1)))]


def test_the_loss_weights_give_both_task_types_the_same_gradient_at_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 6))
    y = np.sign(rng.standard_normal(50))
    problem = Problem([x, x], [y, y], np.array([False, True]), intercept=False)
    gw, _ = problem.gradient(np.zeros((6, 2)), np.zeros(2))
    np.testing.assert_allclose(gw[:, 0], gw[:, 1], atol=1e-15)  # -X^T y / n for both
    np.testing.assert_allclose(gw[:, 0], -x.T @ y / 50, atol=1e-15)


@pytest.mark.parametrize("intercept", [True, False])
def test_d5_the_solution_agrees_with_a_conic_solver(intercept):
    cp = pytest.importorskip("cvxpy")
    x, y, cls = _mixed("mixed", seed=2, n=40, p=6)
    lam, ridge, mean_reg = 0.05, 0.01, 0.02
    model = MTLComb(
        lam,
        classification_tasks=cls,
        ridge=ridge,
        mean_reg=mean_reg,
        fit_intercept=intercept,
        max_iter=20000,
        tol=1e-15,
    ).fit(x, y)
    problem = model._prepare(x, y)
    w, b = cp.Variable((6, 4)), cp.Variable(4)
    terms = []
    for t, (xt, yt) in enumerate(zip(problem.features, problem.targets, strict=True)):
        margin = xt @ w[:, t] + (b[t] if intercept else 0)
        if problem.classification[t]:
            terms.append(2 * cp.sum(cp.logistic(-cp.multiply(yt, margin))) / len(yt))
        else:
            terms.append(0.5 * cp.sum_squares(yt - margin) / len(yt))
    centred = w - cp.sum(w, axis=1, keepdims=True) / 4
    objective = (
        sum(terms)
        + ridge * cp.sum_squares(w)
        + mean_reg * cp.sum_squares(centred)
        + lam * cp.sum(cp.norm(w, 2, axis=1))
    )
    reference = cp.Problem(cp.Minimize(objective))
    reference.solve(solver="CLARABEL")
    ours = model.objective_[-1]
    assert ours <= reference.value + 1e-6
    assert ours == pytest.approx(reference.value, rel=1e-4)
    np.testing.assert_allclose(model.coef_.T, w.value, atol=2e-3)


def test_fista_meets_its_convergence_rate():
    x, y, cls = _mixed("mixed", seed=3)
    model = MTLComb(0.05, classification_tasks=cls).fit(x, y)
    problem = model._prepare(x, y)
    best = solve(problem, 0.05, max_iter=20000, tol=1e-15)
    zero_w, zero_b = np.zeros_like(best.coef), problem.null_intercepts()
    distance = float(((zero_w - best.coef) ** 2).sum() + ((zero_b - best.intercept) ** 2).sum())
    run = solve(problem, 0.05, max_iter=200, tol=0.0)
    gaps = np.array(run.objective) - best.objective[-1]
    k = np.arange(1, len(gaps) + 1)
    # F(w_k) - F* <= 2 gamma ||w_0 - w*||^2 / (k + 1)^2, gamma the largest step-size inverse used
    assert np.all(gaps <= 2 * run.lipschitz * distance / (k + 1) ** 2 + 1e-12)


def test_the_tutorial_selects_the_twenty_true_features_at_lambda_one():
    x, y, weights, cls = joint_selection_problem(seed=0)
    model = MTLComb(1.0, classification_tasks=cls, fit_intercept=False).fit(x, y)
    truth = np.flatnonzero(np.abs(weights).sum(1) > 0)
    assert model.selected_features_.tolist() == truth.tolist()
    assert len(MTLComb(0.1, classification_tasks=cls, fit_intercept=False).fit(x, y).selected_features_) > 100


def test_cross_validation_mixes_the_two_task_types_choices_by_their_counts():
    x, y, _, cls = joint_selection_problem(
        n_regression=3, n_classification=2, n_features=30, n_relevant=5, seed=1
    )
    model = MTLCombCV(classification_tasks=cls, cv=4, random_state=0).fit(x, y)
    assert model.lam_ == pytest.approx(
        3 / 5 * model.lambda_regression_ + 2 / 5 * model.lambda_classification_
    )
    assert model.lambda_regression_ in model.cv_lambdas_ and model.lambda_classification_ in model.cv_lambdas_
    assert model.lambdas_[-1] == pytest.approx(model.lam_)
    predicted = model.predict(x)
    classification = np.isin(x[:, -1], cls)
    assert set(np.unique(predicted[classification])) <= {-1.0, 1.0}
    proba = model.predict_proba(x[classification])
    np.testing.assert_allclose(proba.sum(1), 1.0)
    with pytest.raises(ValueError, match="no class probabilities"):
        model.predict_proba(x)


def test_bad_inputs_are_refused():
    x, y, _ = _mixed("mixed")
    with pytest.raises(ValueError, match="exactly 2 labels"):
        MTLComb(classification_tasks=(0,)).fit(x, y)
    with pytest.raises(ValueError, match="not among the tasks"):
        MTLComb(classification_tasks=(9,)).fit(x, y)
    with pytest.raises(ValueError, match="lam must be > 0"):
        MTLComb(-1.0).fit(x, y)


@given(
    tasks=st.integers(1, 4),
    features=st.integers(1, 6),
    samples=st.integers(3, 20),
    kinds=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
@settings(max_examples=40, deadline=None)
def test_lambda_max_is_the_exact_entry_point_on_random_problems(tasks, features, samples, kinds, seed, scale):
    rng = np.random.default_rng(seed)
    data, cls = [], []
    for t in range(tasks):
        x = scale * rng.standard_normal((samples, features))
        y = rng.standard_normal(samples)
        if kinds[t]:
            y = np.where(np.arange(samples) % 2 == 0, 1.0, -1.0)[rng.permutation(samples)]
            cls.append(t)
        data.append((x, y))
    x, y = stack_tasks(data)
    top = MTLComb(classification_tasks=cls).fit(x, y).lambda_max_
    assert np.count_nonzero(MTLComb(top, classification_tasks=cls).fit(x, y).coef_) == 0
    inside = MTLComb(0.5 * top, classification_tasks=cls, n_lambdas=2, max_iter=200, tol=1e-12).fit(x, y)
    assert np.count_nonzero(inside.coef_) > 0


def test_the_path_and_single_penalty_edges():
    x, y, cls = _mixed("mixed", seed=4)
    one = MTLComb(0.01, classification_tasks=cls, n_lambdas=1).fit(x, y)
    assert one.lambdas_.tolist() == [0.01]  # the penalty asked for, not lambda_max
    path = MTLComb(classification_tasks=cls).fit(x, y)
    assert path.lambdas_[0] == path.lambda_max_ and np.count_nonzero(path.path_coefs_[0]) == 0
    with pytest.raises(ValueError, match="lambda_ratio < 1"):
        MTLCombCV(classification_tasks=cls, lambda_ratio=1.0).fit(x, y)


def test_cross_validation_keeps_both_classes_in_every_training_fold():
    rng = np.random.default_rng(1)
    x0, x1 = rng.standard_normal((40, 5)), rng.standard_normal((40, 5))
    labels = -np.ones(40)
    labels[:2] = 1.0  # two positives among 40 rows: the official dealing can lose both from a fold
    x, y = stack_tasks([(x0, x0[:, 0] + rng.standard_normal(40)), (x1, labels)])
    for seed in range(6):
        MTLCombCV(classification_tasks=(1,), random_state=seed).fit(x, y)  # used to hang for seed 1
    labels[1] = -1.0
    x, y = stack_tasks([(x0, x0[:, 0]), (x1, labels)])
    with pytest.raises(ValueError, match="class with one row"):
        MTLCombCV(classification_tasks=(1,)).fit(x, y)


def test_constant_targets_give_zero_coefficients_and_weights_count_in_the_score():
    rng = np.random.default_rng(0)
    x, y = stack_tasks([(rng.standard_normal((20, 3)), np.full(20, 2.0)) for _ in range(2)])
    model = MTLComb(0.1).fit(x, y)
    assert np.count_nonzero(model.coef_) == 0 and np.allclose(model.predict(x), 2.0)
    x, y, _ = _mixed("regression", seed=5)
    model = MTLComb(0.01).fit(x, y)
    weight = np.zeros(len(y))
    weight[:10] = 1.0  # only task 0's first rows count
    rows = x[:, -1] == 0
    expected = 1 - np.sum((y[:10] - model.predict(x[:10])) ** 2) / np.sum((y[:10] - y[:10].mean()) ** 2)
    assert model.score(x, y, sample_weight=weight) == pytest.approx(expected)
    assert model.score(x, y) != pytest.approx(model.score(x[rows], y[rows]))
