"""Gradient statistics: the spec's identities (identical tasks: cosine 1; negated labels in a
linear model: -1; orthogonal feature supports: 0), GMS, no extra backward when the method already
has the Gramian, per-layer statistics, the epoch rows, resume and the figure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlkit as mk
from mtlkit.errors import ConfigError
from mtlkit.relatedness import GradientStatistics, pairwise_statistics


class Linear(mk.models.MultiTaskModule):
    """Two tasks read one shared weight vector: task a the first ``split`` features, task b the rest
    (``split=None``: both read all of them)."""

    def __init__(self, split=None):
        super().__init__(["a", "b"])
        self.w = nn.Linear(6, 1, bias=False)
        nn.init.constant_(self.w.weight, 0.0)
        self.split = split

    def shared_modules(self):
        return [self.w]

    def task_modules(self, task):
        return []

    def forward_tasks(self, x, tasks):
        if self.split is None:
            y = self.w(x).squeeze(-1)
            return mk.MultiTaskOutput({t: y for t in tasks}, None)
        wa = self.w.weight[0, : self.split]
        wb = self.w.weight[0, self.split :]
        out = {"a": x[:, : self.split] @ wa, "b": x[:, self.split :] @ wb}
        return mk.MultiTaskOutput({t: out[t] for t in tasks}, None)


TASKS = mk.TaskSet([mk.Task("a", loss="mse"), mk.Task("b", loss="mse")])


def measured(model, targets_b, split=None):
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    t = x @ torch.arange(1.0, 7.0)
    probe = mk.Batch(x, {"a": t, "b": targets_b(t)})
    stats = GradientStatistics(probe=probe)
    trainer = mk.Trainer(
        model,
        TASKS,
        "ew",
        torch.optim.SGD(model.parameters(), lr=0.0),
        device="cpu",
        progress=False,
        callbacks=[stats],
    )
    trainer.fit([probe], epochs=1)
    return stats.matrices(), trainer.history[-1]


def test_identical_tasks_have_cosine_one_and_negated_labels_minus_one():
    same, row = measured(Linear(), lambda t: t)
    assert float(same["cos"][0, 1]) == pytest.approx(1.0, abs=1e-12)
    assert row["relatedness/conflict_rate/a~b"] == 0.0
    negated, row = measured(Linear(), lambda t: -t)
    assert float(negated["cos"][0, 1]) == pytest.approx(-1.0, abs=1e-12)
    assert row["relatedness/conflict_rate/a~b"] == 1.0
    assert row["relatedness/gms/a~b"] == pytest.approx(1.0)  # equal magnitudes


def test_orthogonal_feature_supports_have_cosine_zero():
    matrices, _ = measured(Linear(split=3), lambda t: t)
    assert float(matrices["cos"][0, 1]) == 0.0


def test_gms_and_conflicts_from_a_gramian():
    g = torch.tensor([[1.0, 0.0], [-2.0, 0.5]], dtype=torch.float64)  # norms 1 and sqrt(4.25)
    stats = pairwise_statistics(g @ g.T)
    n1, n2 = 1.0, 4.25**0.5
    assert float(stats["gms"][0, 1]) == pytest.approx(2 * n1 * n2 / (n1**2 + n2**2))
    assert float(stats["conflict"][0, 1]) == 1.0 and float(stats["cos"][0, 1]) == pytest.approx(-2 / n2)


def test_a_gramian_method_needs_no_extra_backward_and_a_loss_weighting_needs_a_probe(tmp_path, monkeypatch):
    data = mk.data.load_mmoe_synthetic(n_train=128, n_val=32, n_test=32, dim=6)
    calls = []
    real = mk.GradientEngine.jacobian
    monkeypatch.setattr(
        mk.GradientEngine, "jacobian", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    torch.manual_seed(0)
    model = mk.models.SharedBottom(6, data.tasks, bottom_dims=[8], tower_dims=[4])
    stats = GradientStatistics()
    trainer = mk.Trainer(
        model,
        data.tasks,
        "mgda",
        device="cpu",
        progress=False,
        callbacks=[stats],
        log_dir=tmp_path,
        tensorboard=False,
    )
    trainer.fit(mk.data.loader(data.train, 32), epochs=2)
    assert len(calls) == 8  # MGDA's own per-task passes only: one per step
    assert "relatedness/cosine/y1~y2" in trainer.history[-1]
    assert "relatedness/cosine/y1~y2" in (tmp_path / "epochs.csv").read_text()  # logged after the callbacks
    assert stats.plot(tmp_path / "stats.png").stat().st_size > 0
    ew = mk.Trainer(model, data.tasks, "ew", device="cpu", progress=False, callbacks=[GradientStatistics()])
    with pytest.raises(ConfigError, match="probe"):
        ew.fit(mk.data.loader(data.train, 32), epochs=1)


def test_per_layer_statistics_and_a_state_round_trip():
    data = mk.data.load_mmoe_synthetic(n_train=64, n_val=32, n_test=32, dim=6)
    torch.manual_seed(0)
    model = mk.models.SharedBottom(6, data.tasks, bottom_dims=[8, 4], tower_dims=[4])
    probe = next(iter(mk.data.loader(data.val, 32)))
    stats = GradientStatistics(probe=probe, per_layer=True, every=2)
    trainer = mk.Trainer(model, data.tasks, "ew", device="cpu", progress=False, callbacks=[stats])
    trainer.fit(mk.data.loader(data.train, 16), epochs=1)
    layers = [k for k in stats.matrices() if k.startswith("cos@")]
    assert layers == ["cos@bottom.0", "cos@bottom.2"]
    assert len(stats.trace) == 2  # every second of the 4 steps
    again = GradientStatistics(probe=probe, per_layer=True, every=2)
    again.load_state_dict(stats.state_dict())
    assert again.trace == stats.trace and torch.equal(again.matrices()["cos"], stats.matrices()["cos"])
    with pytest.raises(ConfigError, match="probe"):
        GradientStatistics(per_layer=True)
