"""Every registered estimator passes scikit-learn's own estimator checks and behaves as a
multi-task estimator inside scikit-learn's tools (clone, cross-validation, pickling), with
reproducible ``random_state`` and clear errors for bad task ids."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone, is_classifier
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from mtlkit.estimators import ESTIMATORS, outlier_task_problem, stack_tasks

#: small settings per registered estimator: enough to run scikit-learn's checks in seconds
SMALL = {
    "rmtgb_regressor": {"n_iter_1st": 20, "n_iter_2nd": 5, "n_iter_3rd": 5, "random_state": 0},
    "rmtgb_classifier": {"n_iter_1st": 20, "n_iter_2nd": 5, "n_iter_3rd": 5, "random_state": 0},
    "mtlcomb": {},
    "mtlcomb_cv": {"cv": 3, "random_state": 0},
    "tfcl": {"max_iter": 5, "inner_iter": 20},
}


def test_every_registered_estimator_has_check_settings():
    assert sorted(SMALL) == ESTIMATORS.available()


def _single_task(name):
    return ESTIMATORS.create(name, task_column=None, **SMALL[name])


@parametrize_with_checks([_single_task(name) for name in sorted(SMALL)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def _multi_task_data(name):
    x, y, _ = outlier_task_problem(
        n_tasks=4, n_outliers=1, n_samples=60, classification="classifier" in name, seed=1
    )
    return x, y


def _multi(name):
    return ESTIMATORS.create(name, **SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_multi_task_fit_is_reproducible_and_survives_clone_and_pickle(name):
    x, y = _multi_task_data(name)
    first = _multi(name).fit(x, y)
    second = clone(first).fit(x, y)
    np.testing.assert_array_equal(first.predict(x), second.predict(x))
    restored = pickle.loads(pickle.dumps(first))
    np.testing.assert_array_equal(restored.predict(x), first.predict(x))
    assert list(first.tasks_) == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_cross_validation_with_the_task_column(name):
    x, y = _multi_task_data(name)
    within_tasks = StratifiedKFold(3, shuffle=True, random_state=0).split(
        x, x[:, -1]
    )  # every task in every fold
    scores = cross_val_score(_multi(name), x, y, cv=list(within_tasks))
    assert np.all(np.isfinite(scores))
    if not is_classifier(_multi(name)):
        assert scores.mean() > 0.0  # better than the mean on smooth tasks


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bad_task_ids_get_clear_errors(name):
    x, y = _multi_task_data(name)
    model = _multi(name).fit(x, y)
    unseen = x.copy()
    unseen[:, -1] = 7
    with pytest.raises(ValueError, match="not seen in fit"):
        model.predict(unseen)
    fractional = x.copy()
    fractional[:, -1] += 0.5
    with pytest.raises(ValueError, match="whole-number task ids"):
        _multi(name).fit(fractional, y)
    with pytest.raises(ValueError, match="not a column of X"):
        ESTIMATORS.create(name, task_column=99).fit(x, y)


def test_stack_tasks_puts_the_task_id_last_and_checks_shapes():
    x, y = stack_tasks([(np.ones((2, 3)), np.zeros(2)), (np.zeros((1, 3)), np.ones(1))])
    assert x.shape == (3, 4) and x[:, -1].tolist() == [0.0, 0.0, 1.0] and y.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="features"):
        stack_tasks([(np.ones((2, 3)), np.zeros(2)), (np.ones((2, 4)), np.zeros(2))])
    with pytest.raises(ValueError, match="no tasks"):
        stack_tasks([])


def test_group_splits_make_unseen_tasks_an_error_not_a_silent_guess():
    x, y = _multi_task_data("rmtgb_regressor")
    with pytest.raises(ValueError, match="not seen in fit"):
        cross_val_score(
            _multi("rmtgb_regressor"), x, y, cv=GroupKFold(2), groups=x[:, -1], error_score="raise"
        )
