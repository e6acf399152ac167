import csv
import math
import pickle
import shutil

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import CheckpointError, NonFiniteLossError
from mtlkit.train import EarlyStopping, EvaluationReport
from mtlkit.train.checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint


@pytest.fixture
def synth():
    return mk.data.load_mmoe_synthetic(n_train=512, n_val=256, n_test=256, correlation=0.5, dim=12, seed=1)


def make_trainer(synth, tmp_path, method="mgda", **kw):
    torch.manual_seed(0)
    model = mk.models.MMoE(12, synth.tasks, num_experts=3, expert_dims=[16], tower_dims=[8])
    kw.setdefault("log_every", 1)
    return mk.Trainer(model, synth.tasks, method, device="cpu", log_dir=tmp_path, progress=False, **kw)


def test_fit_writes_logs_checkpoints_and_reports(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path)
    history = trainer.fit(
        mk.data.loader(synth.train, 64, shuffle=True), mk.data.loader(synth.val, 128), epochs=2
    )
    assert len(history) == 2 and "val/y1/mse" in history[-1]
    rows = list(csv.DictReader((tmp_path / "steps.csv").read_text().splitlines()))
    assert len(rows) == 16
    assert {"weight/y1", "weight/y2", "cosine/y1~y2", "grad_norm/y1", "loss/y1"} <= set(rows[0])
    assert all(abs(float(r["weight/y1"]) + float(r["weight/y2"]) - 1) < 1e-6 for r in rows)  # MGDA: simplex
    assert (tmp_path / "epochs.csv").exists() and (tmp_path / "run.json").exists()
    assert any((tmp_path / "tensorboard").iterdir())
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000016-end"
    report = trainer.evaluate(mk.data.loader(synth.test, 128))
    assert set(report.metrics) == {"y1", "y2"} and report.delta_m is None
    # a reference report gives Δm% (Maninis et al.: positive = better)
    ref = {
        "y1": {"mse": report.metrics["y1"]["mse"] * 1.1, "r2": report.metrics["y1"]["r2"]},
        "y2": report.metrics["y2"],
    }
    with_ref = trainer.evaluate(mk.data.loader(synth.test, 128), reference=ref)
    expected = ((0.1 / 1.1) * 100 / 2) / 2  # y1: mse 10/1.1 % better, r2 equal -> mean; y2: 0
    assert with_ref.delta_m == pytest.approx(expected)


def test_training_reduces_the_loss_on_real_signal(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, method="ew", tensorboard=False)
    trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=1e-2)
    before = trainer.evaluate(mk.data.loader(synth.val, 256))
    trainer.fit(mk.data.loader(synth.train, 64, shuffle=True), epochs=10)
    after = trainer.evaluate(mk.data.loader(synth.val, 256))
    for t in ("y1", "y2"):
        assert after.metrics[t]["mse"] < 0.7 * before.metrics[t]["mse"]


def early_stopping_trainer(synth, tmp_path, patience):
    """mode="max" on an MSE that training lowers: epoch 1 stays the best, so a run stops after
    1 + patience epochs and ends with the epoch-1 weights."""
    trainer = make_trainer(
        synth,
        tmp_path,
        method="ew",
        early_stopping=EarlyStopping("y1/mse", patience=patience, mode="max"),
        tensorboard=False,
    )
    trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=1e-2)
    return trainer


def test_early_stopping_and_restore_best(synth, tmp_path):
    trainer = early_stopping_trainer(synth, tmp_path, patience=2)
    history = trainer.fit(mk.data.loader(synth.train, 64), mk.data.loader(synth.val, 256), epochs=20)
    assert len(history) == 3
    assert history[1]["val/y1/mse"] < history[0]["val/y1/mse"]
    final = trainer.evaluate(mk.data.loader(synth.val, 256)).metrics["y1"]["mse"]
    assert final == pytest.approx(history[0]["val/y1/mse"], rel=1e-6)
    assert trainer.early_stopping.best_epoch == 1
    assert latest_checkpoint(tmp_path / "checkpoints", "best").name.startswith("best-")


def test_non_finite_loss_stops_before_any_update(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, tensorboard=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    x, y = synth.train.inputs[:8].clone(), {k: v[:8].clone() for k, v in synth.train.targets.items()}
    y["y2"][0] = math.inf
    with pytest.raises(NonFiniteLossError, match="y2"):
        trainer.train_step((x, y))
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_missing_labels_end_to_end(synth, tmp_path):
    targets = {k: v.clone() for k, v in synth.train.targets.items()}
    targets["y2"][: len(targets["y2"]) // 2] = math.nan  # first half of the data has no y2 label
    data = mk.data.MultiTaskTensorDataset(synth.train.inputs, targets)
    trainer = make_trainer(synth, tmp_path, tensorboard=False)
    info = trainer.train_step(data.__getitems__(list(range(32))))  # a batch with no y2 label at all
    assert info.weights[1] == 0 and info.weights[0] == 1
    trainer.fit(mk.data.loader(data, 64, shuffle=True), epochs=1)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    report = trainer.evaluate(mk.data.loader(data, 256))
    assert report.labelled == {"y1": 512, "y2": 256}


def test_corrupt_checkpoint_is_refused_and_nothing_is_loaded(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, tensorboard=False)
    trainer.fit(mk.data.loader(synth.train, 64), epochs=1)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    fresh = make_trainer(synth, tmp_path / "other", tensorboard=False)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    model_file = ckpt / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        fresh.load_checkpoint(ckpt)
    model_file.write_bytes(data)
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, before[k])
    fresh.load_checkpoint(ckpt)  # intact again: loads
    assert fresh.step == trainer.step


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_checkpoint_state_is_never_unpickled_as_code(synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(synth, tmp_path, tensorboard=False)
    trainer.fit(mk.data.loader(synth.train, 64), epochs=1)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    import hashlib
    import json

    evil = pickle.dumps({"payload": _Evil()}, protocol=2)
    (ckpt / STATE_FILE).write_bytes(evil)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][STATE_FILE] = {"bytes": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(ckpt)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_for_other_tasks_is_refused(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, tensorboard=False)
    trainer.fit(mk.data.loader(synth.train, 64), epochs=1)
    tasks = mk.TaskSet([mk.Task("a"), mk.Task("b")])
    other = mk.Trainer(mk.models.SharedBottom(12, tasks), tasks, "ew", device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="written for tasks"):
        other.load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))


def test_grad_scaler_gradients_are_unscaled_before_the_method(synth):
    """Losses scaled by 2^10 (exact in binary): same weights and Gramian, .grad scaled by 2^10."""
    torch.manual_seed(0)
    model = mk.models.MMoE(12, synth.tasks, num_experts=3, expert_dims=[16], tower_dims=[8]).double()
    batch = synth.train.__getitems__(list(range(32)))
    x = batch.inputs.double()
    y = {k: v.double() for k, v in batch.targets.items()}
    method = mk.methods.MGDA()
    ref = method.backward(synth.tasks.losses(model(x), y), model)
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    scale = 2.0**10
    losses = synth.tasks.losses(model(x), y)
    scaled = losses.map(lambda v: v * scale)
    info = method.backward(scaled, model, loss_scale=scale)
    torch.testing.assert_close(info.gramian, ref.gramian, rtol=1e-12, atol=0)
    torch.testing.assert_close(info.weights, ref.weights, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(info.losses, ref.losses, rtol=0, atol=0)
    for p, g in zip(model.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad / scale, g, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_training_runs(synth, tmp_path, amp):
    trainer = make_trainer(synth, tmp_path, amp=amp, tensorboard=False)
    trainer.fit(mk.data.loader(synth.train, 64, shuffle=True), epochs=1)
    assert trainer.last_info.gramian.dtype == torch.float64
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    if amp == "fp16":
        assert trainer.precision.scaler is not None and trainer.precision.scaler.get_scale() > 0


def test_report_round_trip_and_merge(tmp_path):
    a = EvaluationReport({"a": {"auc": 0.8}}, {"a": {"auc": True}}, {"a": 0.3}, {"a": 10})
    b = EvaluationReport({"b": {"mse": 2.0}}, {"b": {"mse": False}}, {"b": 1.0}, {"b": 10})
    merged = EvaluationReport.merge([a, b])
    merged.save(tmp_path / "ref.json")
    loaded = EvaluationReport.load(tmp_path / "ref.json")
    assert loaded.metrics == {"a": {"auc": 0.8}, "b": {"mse": 2.0}}
    mtl = EvaluationReport({"a": {"auc": 0.88}, "b": {"mse": 2.5}}, loaded.directions).with_reference(loaded)
    assert mtl.per_task_delta == pytest.approx({"a": 10.0, "b": -25.0})
    assert mtl.delta_m == pytest.approx(-7.5)


def test_gradient_clipping_bounds_the_update(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, method="ew", grad_clip=1e-3, tensorboard=False)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])
    trainer.train_step(synth.train.__getitems__(list(range(64))))
    after = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    assert (after - before).norm() <= 1e-3 * (1 + 1e-5)  # SGD lr 1: the step is the clipped gradient
    assert (after - before).norm() > 0.9e-3


def test_single_task_training(synth, tmp_path):
    tasks = mk.TaskSet([synth.tasks["y1"]])
    model = mk.models.SharedBottom(12, tasks, bottom_dims=[16], tower_dims=[8])
    for method in ("ew", "mgda"):
        trainer = mk.Trainer(model, tasks, method, device="cpu", progress=False)
        trainer.fit(mk.data.loader(synth.train, 64), epochs=1)
        assert trainer.last_info.weights.tolist() == [1.0]
    report = trainer.evaluate(mk.data.loader(synth.val, 256))
    assert list(report.metrics) == ["y1"]


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_fp16_gramians_stay_finite(synth, tmp_path, level):
    """Autocast representations are float16: their Gramian must not be formed in float16, where
    the scaled gradients' products overflow (NaN weights: every such step would be skipped)."""
    torch.manual_seed(0)
    model = mk.models.MMoE(12, synth.tasks, num_experts=3, expert_dims=[16], tower_dims=[8])
    trainer = mk.Trainer(
        model, synth.tasks, mk.methods.MGDA(level=level), device="cpu", amp="fp16", progress=False
    )
    for i in range(6):
        info = trainer.train_step(synth.train.__getitems__(list(range(64 * i, 64 * (i + 1)))))
        assert torch.isfinite(info.weights).all() and torch.isfinite(info.gramian).all()


def test_checkpoint_of_another_configuration_is_refused_and_nothing_changes(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, method="ew", tensorboard=False)
    trainer.fit(mk.data.loader(synth.train, 64), epochs=1)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    other = make_trainer(synth, tmp_path / "o1", method="mgda", tensorboard=False)
    with pytest.raises(CheckpointError, match="saved by EW"):
        other.load_checkpoint(ckpt)
    # the same class under another configuration: a parameter-level MGDA run does not resume
    # into a representation-level one (only class names used to be compared)
    mgda = make_trainer(synth, tmp_path / "mgda", method="mgda", tensorboard=False)
    mgda.fit(mk.data.loader(synth.train, 64), epochs=1)
    ub = make_trainer(synth, tmp_path / "mgda", method="mgda_ub", tensorboard=False)
    with pytest.raises(CheckpointError, match="level"):
        ub.fit(mk.data.loader(synth.train, 64), epochs=2)
    assert ub.step == 0
    # Same classes, but the optimiser's parameter groups differ: applying fails half-way and
    # everything is rolled back.
    other = make_trainer(synth, tmp_path / "o2", method="ew", tensorboard=False)
    other.optimizer = torch.optim.Adam(
        [
            {"params": other.model.shared_parameters()},
            {"params": [p for ps in other.model.task_parameters().values() for p in ps]},
        ]
    )
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit this run"):
        other.load_checkpoint(ckpt)
    assert other.step == 0
    for k, v in other.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_finished_early_stop_is_not_trained_on_after_resume(synth, tmp_path):
    def run(epochs):
        trainer = early_stopping_trainer(synth, tmp_path, patience=1)
        trainer.fit(mk.data.loader(synth.train, 64), mk.data.loader(synth.val, 256), epochs=epochs)
        return trainer

    first = run(10)
    assert first.stopped and first.epoch == 2
    again = run(10)  # resumes from the final checkpoint: stopped, nothing more to do
    assert again.step == first.step and len(again.history) == 2


def test_early_stopping_rules_are_checked_up_front(synth, tmp_path):
    with pytest.raises(mk.errors.ConfigError, match="mode"):
        EarlyStopping("y1/mse", mode="maximize")
    with pytest.raises(mk.errors.UnknownNameError, match="Did you mean 'y1/mse'"):
        make_trainer(synth, tmp_path, early_stopping=EarlyStopping("y1/mes"))
    with pytest.raises(mk.errors.UnknownNameError, match="delta_m"):  # no reference given
        make_trainer(synth, tmp_path, early_stopping=EarlyStopping("delta_m"))
    trainer = make_trainer(synth, tmp_path, early_stopping=EarlyStopping("y1/mse"))
    with pytest.raises(mk.errors.ConfigError, match="val_loader"):
        trainer.fit(mk.data.loader(synth.train, 64), epochs=1)
    with pytest.raises(mk.errors.TaskError, match="no result for task 'y2'"):
        make_trainer(synth, tmp_path, reference={"y1": {"mse": 1.0, "r2": 0.5}})


def test_undefined_delta_is_nan_with_a_warning():
    rep = EvaluationReport({"a": {"auc": math.nan}}, {"a": {"auc": True}})
    with pytest.warns(RuntimeWarning, match="undefined"):
        rep.with_reference({"a": {"auc": 0.8}})
    assert math.isnan(rep.delta_m)


def test_empty_loaders_are_errors_and_nothing_is_written(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, tensorboard=False)
    empty = synth.train.subset(torch.arange(0))
    with pytest.raises(mk.errors.EmptyDataError, match="training loader has no batch"):
        trainer.fit(mk.data.loader(empty, 64), epochs=1)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(mk.errors.EmptyDataError, match="training loader yielded no batch"):
        trainer.fit(iter(()), epochs=1)  # a generator has no len(): found when the epoch is empty
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(mk.errors.EmptyDataError, match="evaluation loader"):
        trainer.evaluate(mk.data.loader(empty, 64))


def test_out_of_range_targets_name_the_task(synth):
    tasks = mk.TaskSet([mk.Task("kind", loss="ce"), mk.Task("flag", loss="bce")])
    model = mk.models.SharedBottom(12, tasks, bottom_dims=[8], tower_dims=[4], out_features={"kind": 3})
    trainer = mk.Trainer(model, tasks, device="cpu", progress=False)
    x = synth.train.inputs[:4]
    with pytest.raises(mk.errors.TaskError, match="Task 'kind': class index 3 is out of range for 3 classes"):
        trainer.train_step((x, {"kind": torch.tensor([0, 1, 2, 3]), "flag": torch.zeros(4)}))
    with pytest.raises(mk.errors.TaskError, match=r"Task 'flag': loss 'bce' needs labels in \[0, 1\]"):
        trainer.train_step((x, {"kind": torch.tensor([0, 1, 2, -100]), "flag": torch.tensor([0.0, 1, 2, 1])}))
    # missing labels (a negative class index, NaN) are not out of range
    trainer.train_step(
        (x, {"kind": torch.tensor([0, 1, 2, -100]), "flag": torch.tensor([0.0, 1, math.nan, 1])})
    )


def test_a_run_killed_before_its_first_checkpoint_logs_no_step_twice(synth, tmp_path):
    class Crash(RuntimeError):
        pass

    def crashing():
        for i, batch in enumerate(mk.data.loader(synth.train, 64)):
            if i == 5:
                raise Crash
            yield batch

    trainer = make_trainer(synth, tmp_path, tensorboard=False)
    with pytest.raises(Crash):
        trainer.fit(crashing(), epochs=1)
    assert not (tmp_path / "checkpoints").exists()
    make_trainer(synth, tmp_path, tensorboard=False).fit(mk.data.loader(synth.train, 64), epochs=1)
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "steps.csv").read_text().splitlines())]
    assert steps == list(range(1, 9))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, tensorboard=False, checkpoint_every=3, keep_checkpoints=3)
    trainer.fit(mk.data.loader(synth.train, 64), epochs=1)  # 8 steps: step-3, step-6, step-8-end
    latest = latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step-00000008-end"
    (latest / "model.safetensors").write_bytes(b"garbage")
    resumed = make_trainer(synth, tmp_path, tensorboard=False, checkpoint_every=3, keep_checkpoints=3)
    with pytest.warns(
        UserWarning, match=r"step-00000008-end.*corrupt.*older intact checkpoint .*step-00000006"
    ):
        resumed.fit(mk.data.loader(synth.train, 64), epochs=1)
    assert resumed.step == 8 and resumed.epoch == 1  # redid steps 7 and 8 from step 6
    for name in ("step-00000003", "step-00000006", "step-00000008-end"):
        shutil.rmtree(tmp_path / "checkpoints" / name, ignore_errors=True)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000008-end")
    with pytest.raises(CheckpointError, match="No other intact checkpoint"):
        make_trainer(synth, tmp_path, tensorboard=False).fit(mk.data.loader(synth.train, 64), epochs=2)


def test_safetensors_files_are_byte_reproducible_across_processes(tmp_path):
    import hashlib
    import subprocess
    import sys

    code = (
        "import sys, torch; from mtlkit.train.checkpoint import safetensors_bytes; "
        "t = {f'w{i}': torch.arange(6.0).reshape(2, 3) * i for i in range(5)}; "
        "sys.stdout.buffer.write(safetensors_bytes(t))"
    )
    outs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout for _ in range(4)
    ]
    assert len({hashlib.sha256(o).hexdigest() for o in outs}) == 1


class CountingCallback(mk.train.Callback):
    """A user callback with state: it counts steps and epochs, and its count is checkpointed."""

    def __init__(self):
        self.steps, self.epochs, self.events = 0, 0, []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_step_end(self, trainer, info):
        self.steps += 1

    def on_epoch_end(self, trainer, epoch, row, report):
        self.epochs += 1
        row["seen_steps"] = float(self.steps)  # callbacks may add logged values

    def on_fit_end(self, trainer):
        self.events.append("fit_end")

    def state_dict(self):
        return {"steps": self.steps, "epochs": self.epochs}

    def load_state_dict(self, state):
        self.steps, self.epochs = state.get("steps", 0), state.get("epochs", 0)


def test_callbacks_run_and_their_state_is_checkpointed(synth, tmp_path):
    first = CountingCallback()
    trainer = make_trainer(synth, tmp_path, method="ew", tensorboard=False, callbacks=[first])
    trainer.fit(mk.data.loader(synth.train, 64), epochs=1)
    assert (first.steps, first.epochs, first.events) == (8, 1, ["fit_start", "fit_end"])
    assert trainer.history[-1]["seen_steps"] == 8.0
    second = CountingCallback()
    resumed = make_trainer(synth, tmp_path, method="ew", tensorboard=False, callbacks=[second])
    resumed.fit(mk.data.loader(synth.train, 64), epochs=2)  # resumes after epoch 1
    assert (second.steps, second.epochs) == (16, 2)
    with pytest.raises(TypeError, match="Callback"):
        make_trainer(synth, tmp_path / "x", callbacks=[object()])


def test_a_missing_pointer_with_only_corrupt_checkpoints_is_an_error_not_a_fresh_start(synth, tmp_path):
    trainer = make_trainer(synth, tmp_path, tensorboard=False)
    trainer.fit(mk.data.loader(synth.train, 64), epochs=1)
    (tmp_path / "checkpoints" / "latest").unlink()
    resumed = make_trainer(synth, tmp_path, tensorboard=False)
    with pytest.warns(UserWarning, match="latest is missing; resuming from the newest intact"):
        resumed.fit(mk.data.loader(synth.train, 64), epochs=1)
    assert resumed.step == 8
    (tmp_path / "checkpoints" / "latest").unlink(missing_ok=True)
    for ckpt in (tmp_path / "checkpoints").glob("step-*"):
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="latest is missing and no checkpoint"):
        make_trainer(synth, tmp_path, tensorboard=False).fit(mk.data.loader(synth.train, 64), epochs=2)
