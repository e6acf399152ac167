"""R-MTGB: the outlier tasks found on R-MTGB's scenario 4 (D3), the blocks reducing to plain
gradient boosting, the classifier's probabilities, and the official defaults' pitfall."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingRegressor

from mtlkit.estimators import RMTGBClassifier, RMTGBRegressor, outlier_task_problem


@pytest.mark.parametrize("seed", range(5))
def test_d3_the_two_outlier_tasks_form_the_minority_side(seed):
    x, y, outliers = outlier_task_problem(seed=seed)  # 10 tasks, 2 outliers, 400 samples each
    model = RMTGBRegressor(random_state=seed).fit(x, y)  # n_iter_2nd 100, n_iter_3rd 50
    assert model.outlier_tasks_.tolist() == outliers.tolist()
    scores = model.outlier_scores_
    assert scores[outliers].mean() - np.delete(scores, outliers).mean() > 0.8


def test_the_official_single_partition_round_finds_no_outlier():
    x, y, outliers = outlier_task_problem(seed=0)
    weights = RMTGBRegressor(n_iter_2nd=1, n_iter_3rd=1, random_state=0).fit(x, y).outlier_weights_
    assert abs(weights[outliers].mean() - np.delete(weights, outliers).mean()) < 0.1


def test_the_shared_block_alone_is_gradient_boosting_from_zero():
    x, y, _ = outlier_task_problem(n_tasks=3, n_outliers=1, n_samples=150, seed=3)
    ours = RMTGBRegressor(n_iter_1st=30, n_iter_2nd=0, n_iter_3rd=0, random_state=0).fit(x, y)
    reference = GradientBoostingRegressor(
        n_estimators=30, learning_rate=0.1, max_depth=3, init="zero", random_state=0
    ).fit(x[:, :-1], y)
    np.testing.assert_allclose(ours.predict(x), reference.predict(x[:, :-1]), atol=1e-10)


def test_the_task_block_alone_is_gradient_boosting_per_task():
    x, y, _ = outlier_task_problem(n_tasks=3, n_outliers=1, n_samples=150, seed=4)
    ours = RMTGBRegressor(n_iter_1st=0, n_iter_2nd=0, n_iter_3rd=20, random_state=0).fit(x, y)
    for t in range(3):
        rows = x[:, -1] == t
        reference = GradientBoostingRegressor(
            n_estimators=20, learning_rate=0.1, max_depth=3, init="zero", random_state=0
        ).fit(x[rows, :-1], y[rows])
        np.testing.assert_allclose(ours.predict(x[rows]), reference.predict(x[rows, :-1]), atol=1e-10)


def test_task_ids_map_to_the_fitted_tasks_whatever_the_prediction_batch_holds():
    x, y, _ = outlier_task_problem(n_tasks=4, n_outliers=1, n_samples=80, seed=2)
    model = RMTGBRegressor(n_iter_1st=20, n_iter_2nd=10, n_iter_3rd=10, random_state=0).fit(x, y)
    last = x[:, -1] == 3
    np.testing.assert_allclose(
        model.predict(x[last]), model.predict(x)[last]
    )  # the official code re-indexes here


def test_classifier_probabilities_are_a_softmax_and_find_the_outliers():
    x, y, outliers = outlier_task_problem(classification=True, seed=0)
    model = RMTGBClassifier(random_state=0).fit(x, y)
    proba = model.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(model.classes_[proba.argmax(1)], model.predict(x))
    np.testing.assert_allclose(np.log(proba), model.predict_log_proba(x), atol=1e-10)
    assert model.score(x, y) > 0.8
    assert model.outlier_tasks_.tolist() == outliers.tolist()


def test_three_classes_and_string_labels():
    x, y, _ = outlier_task_problem(n_tasks=3, n_outliers=1, n_samples=120, seed=5)
    labels = np.array(["low", "mid", "high"])[np.digitize(y, np.quantile(y, [1 / 3, 2 / 3]))]
    model = RMTGBClassifier(n_iter_1st=30, n_iter_2nd=10, n_iter_3rd=10, random_state=0).fit(x, labels)
    assert set(model.predict(x)) <= {"low", "mid", "high"} and model.predict_proba(x).shape == (360, 3)
    assert model.decision_function(x).shape == (360, 3)


def test_bad_settings_are_refused():
    x, y, _ = outlier_task_problem(n_tasks=2, n_outliers=1, n_samples=20, seed=0)
    for bad in (
        {"learning_rate": 0.0},
        {"subsample": 1.5},
        {"n_iter_1st": 0, "n_iter_2nd": 0, "n_iter_3rd": 0},
    ):
        with pytest.raises(ValueError):
            RMTGBRegressor(**bad).fit(x, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        RMTGBClassifier().fit(x, np.ones(len(x)))


def test_no_outlier_is_named_without_a_clear_partition():
    x, y, _ = outlier_task_problem(n_tasks=10, n_outliers=0, n_samples=200, seed=0)
    for seed in range(3):
        assert RMTGBRegressor(random_state=seed).fit(x, y).outlier_tasks_.size == 0
    x, y, _ = outlier_task_problem(seed=0)
    untrained = RMTGBRegressor(n_iter_2nd=0, n_iter_3rd=5, random_state=0).fit(x, y)
    assert untrained.outlier_tasks_.size == 0  # the weights are their random start


def test_tree_settings_and_float32_overflow_are_refused():
    x, y, _ = outlier_task_problem(n_tasks=2, n_outliers=1, n_samples=20, seed=0)
    for bad in ({"max_depth": 0}, {"min_samples_leaf": 0}, {"max_features": "bogus"}, {"max_leaf_nodes": 1}):
        with pytest.raises(ValueError):
            RMTGBRegressor(**bad).fit(x, y)
    huge = x.copy()
    huge[0, 0] = 1e39
    with pytest.raises(ValueError, match="too large"):
        RMTGBRegressor(n_iter_1st=2, n_iter_2nd=0, n_iter_3rd=0).fit(huge, y)
