"""Accumulated cross-loss similarity: the filter (an unrelated source gets exactly weight 0), the
inverse-loss weights, rows summing to 1, and the callback during training."""

from __future__ import annotations

import torch

import mtlkit as mk
from mtlkit.relatedness import CrossLossSimilarity, loss_weights


def test_the_filter_and_the_inverse_loss_weights():
    r = torch.tensor([[1.0, 0.5, 4.0], [2.0, 1.0, 3.0], [5.0, 5.0, 1.0]], dtype=torch.float64)
    c = loss_weights(r)
    torch.testing.assert_close(c.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert c[0, 2] == 0 and c[1, 2] == 0 and c[2, 0] == 0 and c[2, 1] == 0  # losses above the own one
    torch.testing.assert_close(c[0, :2], torch.tensor([1.0, 2.0], dtype=torch.float64) / 3)
    assert c[2, 2] == 1.0


def test_an_unrelated_task_gets_exactly_zero_weight_during_training():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=gen)
    t = x @ torch.randn(5, generator=gen)
    data = mk.data.MultiTaskTensorDataset(
        x, {"a": t, "b": t + 0.01 * torch.randn(256, generator=gen), "c": -t}
    )
    tasks = mk.TaskSet([mk.Task(n, loss="mse") for n in "abc"])
    torch.manual_seed(0)
    model = mk.models.SharedBottom(5, tasks, bottom_dims=[16], tower_dims=[8])
    cross = CrossLossSimilarity(nu=0.2)
    trainer = mk.Trainer(
        model,
        tasks,
        "ew",
        torch.optim.Adam(model.parameters(), lr=1e-2),
        device="cpu",
        progress=False,
        callbacks=[cross],
    )
    trainer.fit(mk.data.loader(data, 32, shuffle=True), epochs=5)
    a = cross.relatedness()  # row = source, column = target
    assert a[2, 0] == 0 and a[2, 1] == 0 and a[0, 2] == 0 and a[1, 2] == 0  # the negated task
    # the related pair: a source is kept where its loss on the target's data is no higher than the
    # target's own (here a's head on b's noisier targets), so at least one direction carries weight
    assert max(float(a[0, 1]), float(a[1, 0])) > 0.2
    assert "relatedness/cross_loss/a->b" in trainer.history[-1]
