import math

import numpy as np
import pytest
from sklearn import metrics as skm

import mtlkit as mk
from mtlkit.metrics import compute_metrics, delta_m, get_metric


def test_metric_directions():
    higher = {
        name: get_metric(name).higher_is_better for name in ("accuracy", "auc", "f1", "mse", "mae", "r2")
    }
    assert higher == {"accuracy": True, "auc": True, "f1": True, "mse": False, "mae": False, "r2": True}


def test_binary_metrics_use_labelled_samples_only():
    task = mk.Task("b", loss="bce", metrics=["auc", "accuracy", "f1"])
    y = np.array([1, 0, 1, 0, 1, 0], dtype=float)
    s = np.array([0.9, 0.2, 0.4, 0.6, 0.8, 0.1])
    labelled = np.array([True, True, True, True, False, False])
    got = compute_metrics(task, s, y, labelled)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y[:4], s[:4]))
    assert got["accuracy"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx(skm.f1_score(y[:4], s[:4] >= 0.5))


def test_multiclass_and_regression_metrics():
    ce = mk.Task("c", loss="ce", metrics=["accuracy", "auc", "f1"])
    y = np.array([0, 1, 2, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    got = compute_metrics(ce, p, y, np.ones(4, dtype=bool))
    assert got["accuracy"] == 0.75
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    reg = mk.Task("r", metrics=["mse", "mae", "r2"])
    yt, yp = np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, 2.0])
    got = compute_metrics(reg, yp, yt, np.ones(3, dtype=bool))
    assert got == pytest.approx({"mse": (0.25 + 1) / 3, "mae": 1.5 / 3, "r2": skm.r2_score(yt, yp)})


def test_no_labelled_sample_gives_nan_metrics():
    task = mk.Task("b", loss="bce", metrics=["auc"])
    got = compute_metrics(task, np.array([0.5]), np.array([1.0]), np.array([False]))
    assert math.isnan(got["auc"])


def test_delta_m_follows_maninis_et_al():
    # one higher-is-better and one lower-is-better task: +10% accuracy, -20% error (better) -> +15
    directions = {"a": {"accuracy": True}, "b": {"mae": False}}
    got = delta_m(
        {"a": {"accuracy": 0.88}, "b": {"mae": 0.8}}, {"a": {"accuracy": 0.8}, "b": {"mae": 1.0}}, directions
    )
    assert got == pytest.approx(15.0)


def test_delta_m_leaves_out_a_task_with_no_labelled_sample_in_the_split():
    # an ILEA school with no test pupil: NaN in the result and in the reference; the other task counts
    directions = {"a": {"mse": False}, "b": {"mse": False}}
    reference = {"a": {"mse": 1.0}, "b": {"mse": float("nan")}}
    assert delta_m({"a": {"mse": 0.9}, "b": {"mse": float("nan")}}, reference, directions) == pytest.approx(
        10.0
    )
    # a NaN result against a real reference is still NaN (a diverged model is not left out)
    with pytest.warns(RuntimeWarning, match="undefined"):
        got = delta_m({"a": {"mse": float("nan")}, "b": {"mse": float("nan")}}, reference, directions)
    assert math.isnan(got)
