"""Multi-input training: one loader per task (unequal sizes, their own inputs), every method over
the per-task losses, alternating schedules in the loader, evaluation per task, exact resume."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.data import MultiTaskTensorDataset
from mtlkit.errors import ConfigError, TaskError

TASKS = mk.TaskSet([mk.Task("a", loss="mse"), mk.Task("b", loss="mse")])


def datasets(n_a=96, n_b=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xa = torch.randn(n_a, 6, generator=gen)
    xb = torch.randn(n_b, 6, generator=gen) * 2 + 1  # another input distribution
    wa, wb = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    return MultiTaskTensorDataset(xa, {"a": xa @ wa}), MultiTaskTensorDataset(xb, {"b": xb @ wb})


def multi_loader(schedule=None, batch=16, **kw):
    da, db = datasets()
    loaders = {
        "a": mk.data.loader(da, batch, shuffle=True, generator=torch.Generator()),
        "b": mk.data.loader(db, batch, shuffle=True, generator=torch.Generator()),
    }
    return mk.data.MultiInputLoader(loaders, schedule, **kw)


def model():
    torch.manual_seed(0)
    return mk.models.SharedBottom(6, TASKS, bottom_dims=[8], tower_dims=[4])


def test_epochs_restart_shorter_loaders_and_are_reproducible():
    loader = multi_loader()
    assert len(loader) == 6  # the longest loader: 96 / 16
    first = [{t: b.targets[t].clone() for t, b in step.batches.items()} for step in loader]
    assert all(set(step) == {"a", "b"} for step in first)
    loader.generator.manual_seed(7)
    again = [{t: b.targets[t] for t, b in step.batches.items()} for step in loader]
    loader.generator.manual_seed(7)
    third = [{t: b.targets[t] for t, b in step.batches.items()} for step in loader]
    assert all(torch.equal(x[t], y[t]) for x, y in zip(again, third, strict=True) for t in x)
    b_rows = torch.cat([step["b"] for step in first])
    assert len(b_rows) == 2 * 40 and len(set(b_rows.tolist())) == 40  # b went round twice


def test_the_ew_step_is_the_sum_of_each_tasks_gradient_on_its_own_batch():
    net = model()
    step = next(iter(multi_loader()))
    trainer = mk.Trainer(
        net, TASKS, "ew", torch.optim.SGD(net.parameters(), lr=0.0), device="cpu", progress=False
    )
    trainer.train_step(step)
    got = [p.grad.clone() for p in net.shared_parameters()]
    expected = [torch.zeros_like(p) for p in net.shared_parameters()]
    for name, batch in step.batches.items():
        loss = torch.nn.functional.mse_loss(net(batch.inputs)[name].squeeze(-1), batch.targets[name])
        for e, g in zip(expected, torch.autograd.grad(loss, net.shared_parameters()), strict=True):
            e += g
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def gradient_methods():
    return [n for n in mk.methods.available() if mk.methods.create(n).batches_per_step == 1]


@pytest.mark.parametrize("name", gradient_methods())
def test_every_method_trains_on_multi_input_batches(name):
    net = model()
    method = mk.methods.create(name)
    trainer = mk.Trainer(net, TASKS, method, device="cpu", progress=False)
    loader = multi_loader()
    if method.needs_representation:
        with pytest.raises(ConfigError, match="each task reads its own inputs"):
            trainer.fit(loader, epochs=1)
        return
    before = [p.detach().clone() for p in net.shared_parameters()]
    trainer.fit(loader, epochs=1)
    assert trainer.step == len(loader)
    assert any(not torch.equal(p, b) for p, b in zip(net.shared_parameters(), before, strict=True))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_schedule_in_the_loader_trains_one_task_per_step():
    loader = multi_loader("round_robin")
    assert len(loader) == 6 + 3  # every batch once per epoch in expectation
    tasks = [next(iter(step.batches)) for step in loader]
    assert tasks == ["a", "b"] * 4 + ["a"]
    net = model()
    trainer = mk.Trainer(net, TASKS, "ew", device="cpu", progress=False)
    head_b = [p.detach().clone() for p in net.towers["b"].parameters()]
    info = trainer.train_step(next(iter(multi_loader("round_robin"))))  # task a only
    assert info.weights.tolist() == [1.0, 0.0]
    assert all(p.grad is None for p in net.towers["b"].parameters())
    assert all(torch.equal(p, b) for p, b in zip(net.towers["b"].parameters(), head_b, strict=True))


def test_proportional_schedule_follows_the_dataset_sizes():
    loader = multi_loader("proportional", steps_per_epoch=2000)
    counts = {"a": 0, "b": 0}
    for step in loader:
        counts[next(iter(step.batches))] += 1
    assert abs(counts["a"] / 2000 - 96 / 136) < 0.03


def test_evaluation_goes_through_each_tasks_loader_once():
    da, db = datasets()
    val = mk.data.MultiInputLoader(
        {"a": mk.data.loader(da, 32), "b": mk.data.loader(db, 32)}, mode="sequential"
    )
    net = model()
    report = mk.Trainer(net, TASKS, "ew", device="cpu", progress=False).evaluate(val)
    assert report.labelled == {"a": 96, "b": 40}
    with torch.no_grad():
        mse_b = torch.nn.functional.mse_loss(net(db.inputs)["b"].squeeze(-1), db.targets["b"])
    assert report.losses["b"] == pytest.approx(float(mse_b), rel=1e-5)


def test_bad_multi_input_batches_are_named():
    with pytest.raises(TaskError, match="unknown task"):
        mk.Trainer(model(), TASKS, "ew", device="cpu", progress=False).train_step(
            mk.TaskBatches({"c": mk.Batch(torch.zeros(2, 6), {"c": torch.zeros(2)})})
        )
    with pytest.raises(ConfigError, match="takes no schedule"):
        multi_loader("uniform", mode="sequential")


@pytest.mark.parametrize("name", ["agd", "famo", "mgda"])
def test_a_killed_multi_input_run_resumes_exactly(name, tmp_path):
    def trainer(path):
        net = model()
        method = mk.methods.create(name)
        return mk.Trainer(
            net, TASKS, method, device="cpu", log_dir=path, progress=False, tensorboard=False, seed=2
        )

    ref = trainer(tmp_path / "ref")
    ref.fit(multi_loader("uniform"), epochs=2)

    class Crash(RuntimeError):
        pass

    crashed = trainer(tmp_path / "crash")
    crashed.checkpoint_every = 2
    loader = multi_loader("uniform")
    real_iter = type(loader).__iter__

    def dying(self):
        for i, step in enumerate(real_iter(self)):
            if crashed.epoch == 1 and i == 5:
                raise Crash
            yield step

    type(loader).__iter__ = dying  # type: ignore[method-assign]
    try:
        with pytest.raises(Crash):
            crashed.fit(loader, epochs=2)
    finally:
        type(loader).__iter__ = real_iter  # type: ignore[method-assign]
    resumed = trainer(tmp_path / "crash")
    resumed.fit(multi_loader("uniform"), epochs=2)
    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
