"""HoME: normalised experts, feature gates, the hierarchy mask, self-gates and the anomaly
statistics (spec tests A5, A6)."""

from __future__ import annotations

import math

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError, TaskError
from mtlkit.models.home import FeatureGate, NormalisedExpert

TASKS = mk.TaskSet([mk.Task("a"), mk.Task("b"), mk.Task("c")])
CATEGORIES = {"a": "watch", "b": "watch", "c": "interact"}


def grads(loss, params):
    return torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)


def zero(gs):
    return all(g is None or not g.any() for g in gs)


def test_normalised_experts_have_unit_batch_statistics_and_no_exact_zeros():
    torch.manual_seed(0)
    expert = NormalisedExpert(12, [32, 16], "relu", 0.0, normalised=True)
    x = torch.randn(512, 12) * 3 + 1
    pre = expert.body(x)
    assert (pre.mean(0).abs() < 0.05).all()
    assert ((pre.std(0, unbiased=False) - 1).abs() < 0.05).all()
    assert (expert(x) == 0).sum() == 0
    # a ReLU expert on the same pre-activation outputs about half zeros (HoME's "collapse")
    assert 0.4 < (torch.relu(pre) == 0).double().mean() < 0.6


def test_feature_gate_is_the_identity_at_initialisation():
    gate = FeatureGate(10, 4)
    v = torch.randn(6, 10)
    assert torch.equal(gate(v), v)
    torch.manual_seed(0)
    gated = mk.models.HoME(10, TASKS, categories=CATEGORIES, feature_gate_rank=4)
    plain = mk.models.HoME(10, TASKS, categories=CATEGORIES, feature_gate_rank=None)
    missing, unexpected = plain.load_state_dict(gated.state_dict(), strict=False)
    assert not missing and all(".gate." in k for k in unexpected)
    x = torch.randn(8, 10)
    a, b = gated(x), plain(x)
    for t in TASKS.names:
        torch.testing.assert_close(a[t], b[t], atol=1e-6, rtol=0)


def test_hierarchy_mask_isolates_categories():
    torch.manual_seed(0)
    model = mk.models.HoME(10, TASKS, categories=CATEGORIES)
    out = model(torch.randn(16, 10))
    for t in TASKS.names:
        for c in ("watch", "interact"):
            params = [*model.category[c].parameters(), *model.meta_branches[c].parameters()]
            assert zero(grads(out[t].sum(), params)) == (c != CATEGORIES[t])
    # the meta-level category experts are read by every task, through the global branch
    assert not zero(grads(out["c"].sum(), model.meta_category["watch"].parameters()))
    # the split: a category of two tasks is shared (the method combines a's and b's gradients
    # on it); a one-task category belongs to its task
    shared = {id(p) for p in model.shared_parameters()}
    specific = model.task_parameters()
    watch = {
        id(p) for p in [*model.category["watch"].parameters(), *model.meta_branches["watch"].parameters()]
    }
    interact = {id(p) for p in model.category["interact"].parameters()}
    assert watch <= shared and interact <= {id(p) for p in specific["c"]}
    assert interact.isdisjoint(id(p) for t in ("a", "b") for p in specific[t])


@pytest.mark.parametrize("self_gate", [True, False])
def test_self_gate_keeps_a_gradient_path_to_ignored_task_experts(self_gate):
    torch.manual_seed(0)
    model = mk.models.HoME(10, TASKS, categories=CATEGORIES, self_gate=self_gate, num_task=1)
    branch = model.task_branches["a"]
    with torch.no_grad():  # the global gate puts exactly zero weight on task a's own expert
        branch.gate.bias[-1] = -1e4
    out = model(torch.randn(16, 10))
    assert model.last_gates["a"][:, -1].max() == 0
    g = grads(out["a"].sum(), model.task_experts["a"].parameters())
    assert zero(g) != self_gate


def test_anomaly_statistics():
    torch.manual_seed(0)
    model = mk.models.HoME(10, TASKS, categories=CATEGORIES, num_shared=2)
    model(torch.randn(64, 10))
    stats = model.routing_statistics()
    zeros = {k: v for k, v in stats.items() if k.startswith("experts/")}
    assert len(zeros) == 1 + 2 + 2 + 2 + 3 and all(v == 0 for v in zeros.values())
    for t in TASKS.names:
        parts = [stats[f"underfitting/{t}/{p}"] for p in ("shared", "category", "own")]
        assert math.isclose(sum(parts), 1.0, rel_tol=1e-6)  # float32 gates
    for i in range(2):
        assert 0 <= stats[f"degradation/shared{i}/tasks"] <= 3
        assert 1 / 3 - 1e-9 <= stats[f"degradation/shared{i}/top_share"] <= 1
    relu = mk.models.HoME(10, TASKS, categories=CATEGORIES, normalised_experts=False)
    relu(torch.randn(64, 10))
    assert max(v for k, v in relu.routing_statistics().items() if k.startswith("experts/")) > 0.2


def test_degradation_counts_the_tasks_that_use_a_shared_expert():
    model = mk.models.HoME(10, TASKS, categories=CATEGORIES, num_shared=1, num_category=1, num_task=1)
    with torch.no_grad():  # only task a's gate likes the shared expert (index 0)
        for t, bias in (("a", 10.0), ("b", -10.0), ("c", -10.0)):
            model.task_branches[t].gate.weight.zero_()
            model.task_branches[t].gate.bias.copy_(torch.tensor([bias, 0.0, 0.0]))
    model(torch.randn(8, 10))
    stats = model.routing_statistics()
    assert stats["gate/task/a/shared0"] > 0.99
    assert stats["degradation/shared0/tasks"] == 1
    assert stats["degradation/shared0/top_share"] > 0.99


def test_single_category_default_and_errors():
    model = mk.models.HoME(10, TASKS)
    assert set(model.categories.values()) == {"all"}
    with pytest.raises(TaskError, match="missing"):
        mk.models.HoME(10, TASKS, categories={"a": "x"})
    with pytest.raises(TaskError, match="unknown"):
        mk.models.HoME(10, TASKS, categories={**CATEGORIES, "z": "x"})
    with pytest.raises(ConfigError, match="task_gate_input"):
        mk.models.HoME(10, TASKS, task_gate_input="v")
    with pytest.raises(ConfigError, match=">= 0"):
        mk.models.HoME(10, TASKS, num_task=-1)


def _skewed_training(normalised: bool, seed: int) -> dict[str, float]:
    """HoME with four shared experts per level whose output layers start at scales 0.1, 1, 10,
    100 (the spec's collapse diagnostic), trained 30 epochs with EW on the MMoE synthetic data."""
    data = mk.data.load_mmoe_synthetic(n_train=4000, n_val=500, n_test=500, correlation=0.5, seed=seed)
    torch.manual_seed(seed)
    model = mk.models.HoME(
        100,
        data.tasks,
        num_meta_shared=4,
        num_meta_category=0,
        num_shared=4,
        num_category=0,
        num_task=0,
        expert_dims=[16],
        tower_dims=[8],
        feature_gate_rank=None,
        self_gate=False,
        normalised_experts=normalised,
    )
    with torch.no_grad():
        for group in (model.meta_shared, model.shared):
            for i, e in enumerate(group):
                layer = [m for m in e.expert.body if isinstance(m, torch.nn.Linear)][-1]
                layer.weight.mul_(10.0 ** (i - 1))
                layer.bias.mul_(10.0 ** (i - 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = mk.Trainer(model, data.tasks, "ew", optimizer, device="cpu", progress=False)
    trainer.fit(mk.data.loader(data.train, 128, shuffle=True), epochs=30)
    model(data.train.inputs[:2000])
    return model.routing_statistics()


@pytest.mark.slow
def test_normalised_experts_do_not_collapse_where_relu_experts_do():
    # HoME's first anomaly on skewed expert scales: ReLU experts output many exact zeros and
    # their gates concentrate more; BatchNorm + Swish experts output none
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, whatever the machine
    try:
        relu = [_skewed_training(False, s) for s in range(5)]
        norm = [_skewed_training(True, s) for s in range(5)]
    finally:
        torch.set_num_threads(threads)

    def zeros(stats):
        return max(v for k, v in stats.items() if k.endswith("/zeros"))

    def gate_max(stats):
        return max(v for k, v in stats.items() if k.startswith("gate/task/") and k.endswith("/max"))

    assert all(zeros(s) > 0.3 for s in relu)
    assert all(zeros(s) == 0 for s in norm)
    assert sum(map(gate_max, relu)) > sum(map(gate_max, norm))
