"""DWA: unit weights for constant losses, more weight to the slower task, the window variant."""

import pytest
import torch

import mtlkit as mk
from tests.methods.helpers import end_epoch, fixed_losses, step


def feed_epoch(method, per_task, steps=3):
    for _ in range(steps):
        step(method, fixed_losses(per_task))
    end_epoch(method)


def test_dwa_constant_losses_give_unit_weights_exactly():
    method = mk.methods.DWA()
    for _ in range(4):
        feed_epoch(method, [0.7, 3.0, 0.01])
    info = step(method, fixed_losses([0.7, 3.0, 0.01]))
    assert info.weights.tolist() == [1.0, 1.0, 1.0]


def test_dwa_favours_the_slower_task_and_sums_to_k():
    method = mk.methods.DWA(temperature=2.0)
    seen = []
    for epoch in range(4):
        seen.append(step(method, fixed_losses([0.5**epoch, 1.0])).weights)
        for _ in range(2):
            step(method, fixed_losses([0.5**epoch, 1.0]))
        end_epoch(method)
    assert seen[0].tolist() == [1.0, 1.0] and seen[1].tolist() == [1.0, 1.0]
    w = seen[2]
    expected = 2 * torch.softmax(torch.tensor([0.5, 1.0], dtype=torch.float64) / 2.0, dim=0)  # r = (0.5, 1)
    torch.testing.assert_close(w, expected)
    assert w[0] < w[1] and float(w.sum()) == pytest.approx(2.0)


def test_dwa_iteration_window_variant():
    method = mk.methods.DWA(window=3)
    losses = [[1.0, 2.0], [1.0, 2.0], [0.9, 2.0], [0.5, 2.0], [0.4, 2.0], [0.3, 2.1]]
    weights = [step(method, fixed_losses(row)).weights for row in losses]
    assert all(w.tolist() == [0.5, 0.5] for w in weights[:5])  # before 2n steps: 1/K each
    t = torch.tensor(losses, dtype=torch.float64)
    ratio = t[3:].mean(0) / t[:3].mean(0)
    torch.testing.assert_close(weights[5], torch.softmax(ratio / 2.0, dim=0))  # 2 softmax / K
