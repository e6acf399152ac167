"""MENTOR's pieces: the sparse top-k MoE trunk (dense-mixture identity, zero gradient interaction
under task-pinned routing) and the snapshot perturbation (identity, the soft reset, state round
trip, in the Trainer)."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk

TASKS = mk.TaskSet([mk.Task("a"), mk.Task("b")])


def test_with_every_expert_kept_the_trunk_is_the_softmax_mixture():
    torch.manual_seed(0)
    model = mk.models.SparseMoE(5, TASKS, num_experts=4, top_k=4, expert_dims=[6]).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    z, _ = model.mixture(x)
    p = torch.softmax(x @ model.router.weight, dim=-1)
    expected = sum(p[:, e : e + 1] * model.experts[e](x) for e in range(4))
    torch.testing.assert_close(z, expected, atol=1e-12, rtol=0)


def test_top1_routing_pinned_by_task_makes_the_tasks_independent_networks():
    torch.manual_seed(0)
    model = mk.models.SparseMoE(5, TASKS, num_experts=2, top_k=1, expert_dims=[6], task_embedding=2)
    with torch.no_grad():  # the router reads only the task embedding, which points at expert t
        model.router.weight.zero_()
        model.router.weight[5:] = 10 * torch.eye(2)
        model.embedding.weight.copy_(torch.eye(2))
    x = torch.randn(8, 5)
    out = model(x)
    grads = torch.autograd.grad(out["a"].sum(), list(model.experts[1].parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)  # task a never reaches expert 1
    grads = torch.autograd.grad(out["a"].sum(), list(model.experts[0].parameters()))
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_the_snapshot_perturbation_is_a_no_op_with_one_snapshot_of_the_current_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb = mk.train.SnapshotPerturbation("val/score", snapshots=1, alpha=0.3)
    perturb.offer(1.0, model)
    perturb.perturb(model)  # sigma = 0 around the current weights: any alpha changes nothing
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-7, rtol=0)


def test_the_soft_reset_moves_towards_the_best_snapshots_and_round_trips():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    perturb = mk.train.SnapshotPerturbation("val/score", mode="min", snapshots=2, alpha=0.0)
    good = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(good[n])
    perturb.offer(0.1, model)
    perturb.offer(0.2, model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-5.0)
    perturb.offer(9.0, model)  # the worst: dropped
    perturb.offer(float("nan"), model)  # a diverged epoch: never kept
    assert [v for v, _ in perturb.kept] == [-0.1, -0.2]
    perturb.perturb(model)  # alpha 0: jump to a sample of the best two (both 2.0: std 0)
    assert all(torch.allclose(p, torch.full_like(p, 2.0)) for p in model.parameters())
    clone = mk.train.SnapshotPerturbation("val/score", mode="min", snapshots=2, alpha=0.0)
    clone.load_state_dict(perturb.state_dict())
    assert clone.resets == 1 and len(clone.kept) == 2
    with pytest.raises(mk.errors.ConfigError):
        mk.train.SnapshotPerturbation("val/score", alpha=1.5)


def test_the_callback_runs_in_the_trainer_on_a_validation_value():
    torch.manual_seed(0)
    model = mk.models.SparseMoE(4, TASKS, num_experts=4, top_k=2, expert_dims=[8])
    x, y = torch.randn(64, 4), {"a": torch.randn(64), "b": torch.randn(64)}
    data = mk.data.MultiTaskTensorDataset(x, y)
    perturb = mk.train.SnapshotPerturbation("val/a/loss", mode="min", snapshots=2, every=2, alpha=0.8)
    trainer = mk.Trainer(model, TASKS, "ew", device="cpu", progress=False, callbacks=[perturb])
    history = trainer.fit(mk.data.loader(data, 32), mk.data.loader(data, 64), epochs=4)
    assert perturb.resets == 2 and history[-1]["perturbation/resets"] == 2.0
