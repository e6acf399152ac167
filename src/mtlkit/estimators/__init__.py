"""Classical multi-task estimators with scikit-learn's contract (fit/predict/score, get_params and
set_params, input validation, reproducible ``random_state``): R-MTGB, MTLComb and TFCL. Their
code uses numpy, scipy and scikit-learn only (no torch). Tasks arrive as a task-id column of ``X``
(``task_column``, the last by default) or as a list of ``(X, y)`` per task through
:func:`stack_tasks`."""

from sklearn.base import BaseEstimator

from mtlkit.core.registry import Registry
from mtlkit.estimators.mtlcomb import MTLComb, MTLCombCV
from mtlkit.estimators.rmtgb import RMTGBClassifier, RMTGBRegressor
from mtlkit.estimators.synthetic import block_task_problem, joint_selection_problem, outlier_task_problem
from mtlkit.estimators.tasks import stack_tasks
from mtlkit.estimators.tfcl import TFCL

ESTIMATORS: Registry[BaseEstimator] = Registry("estimator")
for _name, _cls in (
    ("rmtgb_regressor", RMTGBRegressor),
    ("rmtgb_classifier", RMTGBClassifier),
    ("mtlcomb", MTLComb),
    ("mtlcomb_cv", MTLCombCV),
    ("tfcl", TFCL),
):
    ESTIMATORS.register(_name)(_cls)

__all__ = [
    "ESTIMATORS",
    "TFCL",
    "MTLComb",
    "MTLCombCV",
    "RMTGBClassifier",
    "RMTGBRegressor",
    "block_task_problem",
    "joint_selection_problem",
    "outlier_task_problem",
    "stack_tasks",
]
