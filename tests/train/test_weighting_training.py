"""Every loss weighting inside the Trainer: end-to-end on the MMoE synthetic data and exact
resumption of the method's state from two crash points, on the CPU and (where there is one) a GPU.
These are the slow end-to-end runs (``make test-slow``); the cheap per-method resume check for every
registered method is in ``tests/methods/test_contract.py``."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import mtlkit as mk
from mtlkit.train.checkpoint import latest_checkpoint

METHODS = {
    "ew": {},
    "si": {},
    "gls": {},
    "uw": {},
    "imtl_l": {},
    "dwa": {},
    "dwa_window": {"window": 3},
    "rlw": {},
    "gradnorm": {},
    "gradnorm_epoch": {"initial": "first_epoch"},
    "famo": {},
    "stch": {"warmup_epochs": 2},
}


def build(name):
    return mk.methods.create(name.split("_window")[0].split("_epoch")[0], **METHODS[name])


@pytest.fixture(scope="module")
def synth():
    return mk.data.load_mmoe_synthetic(n_train=384, n_val=128, n_test=128, correlation=0.5, dim=12, seed=1)


def make_trainer(synth, tmp_path, name, device="cpu", **kw):
    torch.manual_seed(0)
    model = mk.models.MMoE(12, synth.tasks, num_experts=3, expert_dims=[16], tower_dims=[8])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return mk.Trainer(
        model,
        synth.tasks,
        build(name),
        opt,
        device=device,
        log_dir=tmp_path,
        progress=False,
        tensorboard=False,
        log_every=1,
        seed=3,
        **kw,
    )


class Interrupted(RuntimeError):
    pass


class KillingLoader:
    """Wraps a DataLoader and raises after ``kill_at`` batches in total (a crash mid-run)."""

    def __init__(self, inner, kill_at):
        self.inner, self.kill_at, self.seen = inner, kill_at, 0
        self.generator = getattr(inner, "generator", None)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            if self.seen == self.kill_at:
                raise Interrupted
            self.seen += 1
            yield batch


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_end_to_end_and_logs_its_weights(synth, tmp_path, name):
    trainer = make_trainer(synth, tmp_path, name)
    before = [p.detach().clone() for p in trainer.model.shared_parameters()]
    untrained = trainer.evaluate(mk.data.loader(synth.val, 128))
    history = trainer.fit(
        mk.data.loader(synth.train, 64, shuffle=True), mk.data.loader(synth.val, 128), epochs=4
    )
    assert all(math.isfinite(v) for row in history for v in row.values())
    after = trainer.model.shared_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    rows = list(csv.DictReader((tmp_path / "steps.csv").read_text().splitlines()))
    assert len(rows) == 24
    weights = [[float(r["weight/y1"]), float(r["weight/y2"])] for r in rows]
    assert all(math.isfinite(w) and w > 0 for ws in weights for w in ws)
    if name not in ("ew",):  # every adaptive method actually changes the weights during training
        assert len({tuple(ws) for ws in weights}) > 1, name
    val = trainer.evaluate(mk.data.loader(synth.val, 128))
    for t in ("y1", "y2"):  # it learned something on both tasks
        assert val.metrics[t]["mse"] < 0.8 * untrained.metrics[t]["mse"], (t, val.metrics, untrained.metrics)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(("kill_at", "resumes_from"), [(17, "step-00000016"), (12, "step-00000012-end")])
@pytest.mark.parametrize("name", list(METHODS))
def test_interrupted_run_resumes_to_identical_weights(synth, tmp_path, name, kill_at, resumes_from, device):
    # 6 steps per epoch: DWA (epoch >= 2), STCH (nadir epoch 2) and GradNorm all switch phase.
    # Step 16 is inside epoch 3 (DWA's weighted phase, STCH's nadir epoch); step 12 ends epoch 2.
    # On CUDA this is where method state restored onto the CPU would meet CUDA losses.
    epochs = 4
    ref = make_trainer(synth, tmp_path / "ref", name, device)
    ref.fit(mk.data.loader(synth.train, 64, shuffle=True), epochs=epochs)

    crashed = make_trainer(synth, tmp_path / "run", name, device, checkpoint_every=4)
    with pytest.raises(Interrupted):
        crashed.fit(
            KillingLoader(mk.data.loader(synth.train, 64, shuffle=True), kill_at=kill_at), epochs=epochs
        )
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == resumes_from
    resumed = make_trainer(synth, tmp_path / "run", name, device, checkpoint_every=4)
    resumed.fit(mk.data.loader(synth.train, 64, shuffle=True), epochs=epochs)
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), (name, k)
    for a, b in zip(ref.method.parameters(), resumed.method.parameters(), strict=True):
        assert torch.equal(a, b)
    assert repr(ref.method.state_dict()) == repr(resumed.method.state_dict())


def test_trainer_calls_each_declared_hook(synth, tmp_path):
    famo = make_trainer(synth, tmp_path / "famo", "famo")
    famo.fit(mk.data.loader(synth.train, 64, shuffle=True), epochs=1)
    assert famo.method.logits.abs().sum() > 0  # after_step ran with the post-step losses
    stch = make_trainer(synth, tmp_path / "stch", "stch")
    stch.fit(mk.data.loader(synth.train, 64, shuffle=True), epochs=4)
    assert stch.method.epoch == 4 and stch.method.phase == "stch"  # on_epoch_end ran every epoch
    assert stch.last_info.extras["phase"] == "stch"
