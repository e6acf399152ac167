"""The transfer audit: a target identical to the surrogate transfers fully (relative success 1),
one row per target, task, attack and budget, the summary and rank correlation against scipy, the
representation bias, and bad input."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import mtlkit as mk
from mtlkit.merging.audit import representation_bias, spearman, summarise, transfer_audit


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_an_identical_target_transfers_fully_and_rows_cover_the_grid():
    surrogate = _model(0)
    x = torch.rand(40, 6, 6)
    with torch.no_grad():
        y = surrogate(x).argmax(1)  # every image right on the surrogate
    rows = transfer_audit(
        {"a": surrogate, "b": surrogate},
        {"same": {"a": surrogate, "b": surrogate}, "other": {"a": _model(1), "b": _model(1)}},
        {"a": (x, y), "b": (x, y)},
        attacks=["fgsm", "pgd"],
        budgets=[0.05, 0.1],
    )
    assert len(rows) == 2 * 2 * 2 * 2
    same = [r for r in rows if r["target"] == "same"]
    assert all(r["relative_transfer"] == pytest.approx(1.0) for r in same if r["surrogate_success"] > 0)
    assert all(r["clean_accuracy"] == 1.0 for r in same)
    summary = summarise(rows)
    assert set(summary) == {"same", "other"} and summary["same"] == pytest.approx(1.0)


def test_spearman_agrees_with_scipy_and_the_bias_of_a_model_to_itself_is_zero():
    a, b = [0.3, 0.1, 0.5, 0.5, 0.9], [1.0, 0.2, 0.4, 0.7, 0.8]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    model = _model(2)
    assert representation_bias(model, model, torch.rand(5, 6, 6)) == 0.0
    assert representation_bias(model, _model(3), torch.rand(5, 6, 6)) > 0


def test_bad_input_is_named():
    m = _model(0)
    x, y = torch.rand(4, 6, 6), torch.zeros(4, dtype=torch.long)
    with pytest.raises(mk.errors.ConfigError, match="no data"):
        transfer_audit({"a": m}, {"t": {"a": m}}, {})
    with pytest.raises(mk.errors.ConfigError, match="no model for task"):
        transfer_audit({"a": m}, {"t": {}}, {"a": (x, y)})
    with pytest.raises(mk.errors.ConfigError, match="at least 3"):
        spearman([1.0, 2.0], [1.0, 2.0])
