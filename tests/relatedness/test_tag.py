"""TAG: the spec's three tests (identical and negated tasks; the first-order identity as lr -> 0;
weights and optimiser state bit-identical after a lookahead), the optimiser's own update (Adam),
the callback in a Trainer, and group selection against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import mtlkit as mk
from mtlkit.relatedness import TaskAffinity, lookahead_affinity, select_groups

TASKS = mk.TaskSet([mk.Task("a", loss="mse"), mk.Task("b", loss="mse"), mk.Task("c", loss="mse")])


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    t = x @ torch.randn(5, generator=gen, dtype=torch.float64)
    batch = mk.Batch(x, {"a": t, "b": t.clone(), "c": -t})  # a and b identical, c negated
    torch.manual_seed(seed)
    model = mk.models.SharedBottom(5, TASKS, bottom_dims=[8], tower_dims=[]).double()
    with torch.no_grad():  # identical heads, so tasks a and b are the same task
        model.towers["b"].load_state_dict(model.towers["a"].state_dict())
        model.towers["c"].load_state_dict(model.towers["a"].state_dict())
    return model, batch


def test_identical_tasks_help_and_negated_ones_hurt_and_selection_groups_them():
    model, batch = problem()
    z = lookahead_affinity(model, TASKS, batch, torch.optim.SGD(model.parameters(), lr=0.05))
    assert z.shape == (4, 3)
    assert z[0, 1] > 0 and z[1, 0] > 0
    assert z[0, 2] < 0 and z[2, 0] < 0
    groups, _ = select_groups(z[:3].numpy(), budget=2)
    assert (0, 1) in groups and any(2 in g for g in groups)


def test_first_order_identity_as_the_learning_rate_vanishes():
    model, batch = problem(1)
    lr = 1e-6
    z = lookahead_affinity(model, TASKS, batch, torch.optim.SGD(model.parameters(), lr=lr), combined=False)
    out = model(batch.inputs)
    losses = TASKS.losses(out, batch.targets)
    shared = model.shared_parameters()
    g = [
        torch.cat([v.reshape(-1) for v in torch.autograd.grad(losses[n], shared, retain_graph=True)])
        for n in "abc"
    ]
    for i in range(3):
        for j in range(3):
            expected = float(g[i] @ g[j]) / float(losses["abc"[j]].detach())
            assert float(z[i, j]) == pytest.approx(expected, rel=0.01)


def test_weights_and_optimiser_state_are_left_exactly_as_they_were():
    model, batch = problem(2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # some Adam moments to keep
        opt.zero_grad()
        sum(TASKS.losses(model(batch.inputs), batch.targets).values()).backward()
        opt.step()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {
        k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
        for k, s in opt.state_dict()["state"].items()
    }
    lookahead_affinity(model, TASKS, batch, opt)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    after = opt.state_dict()["state"]
    for k, s in state.items():
        for n, v in s.items():
            assert torch.equal(torch.as_tensor(after[k][n]), torch.as_tensor(v))


def test_the_lookahead_uses_the_optimisers_own_update():
    model, batch = problem(3)
    sgd = lookahead_affinity(
        model, TASKS, batch, torch.optim.SGD(model.parameters(), lr=1e-3), combined=False
    )
    adam = lookahead_affinity(
        model, TASKS, batch, torch.optim.Adam(model.parameters(), lr=1e-3), combined=False
    )
    assert not torch.allclose(sgd, adam)  # Adam's normalised step, not a plain gradient step


def test_the_callback_averages_over_training():
    data = mk.data.load_mmoe_synthetic(n_train=128, n_val=32, n_test=32, dim=6)
    torch.manual_seed(0)
    model = mk.models.SharedBottom(6, data.tasks, bottom_dims=[8], tower_dims=[4])
    tag = TaskAffinity(every=2)
    trainer = mk.Trainer(model, data.tasks, "ew", device="cpu", progress=False, callbacks=[tag])
    trainer.fit(mk.data.loader(data.train, 32), epochs=1)
    assert tag.matrix().shape == (2, 2) and torch.isfinite(tag.matrix()).all()
    assert tag.combined().shape == (2,)
    assert "relatedness/tag/y1->y2" in trainer.history[-1]


def brute_force(a, budget):
    k = len(a)
    subsets = [g for r in range(1, k + 1) for g in itertools.combinations(range(k), r)]
    best = -np.inf
    for r in range(1, budget + 1):
        for choice in itertools.combinations(subsets, r):
            value = []
            for j in range(k):
                scores = []
                for g in choice:
                    if j in g:
                        scores.append(-1e6 if len(g) == 1 else np.mean([a[i, j] for i in g if i != j]))
                value.append(max(scores) if scores else -np.inf)
            best = max(best, float(np.mean(value)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exhaustive_selection_is_optimal_and_greedy_covers(seed):
    a = np.random.default_rng(seed).normal(size=(4, 4))
    _, value = select_groups(a, 2)
    assert value == pytest.approx(brute_force(a, 2))
    greedy, greedy_value = select_groups(a, 2, max_combinations=1)
    assert sorted({t for g in greedy for t in g}) == [0, 1, 2, 3] and greedy_value <= value + 1e-12
