"""Lightning integration: real lightning.Trainer runs that match mtlkit's own loop step for step,
with each lifecycle hook, resume from a Lightning checkpoint, bf16 autocast and clear refusals."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.data.base import MultiTaskTensorDataset, loader
from mtlkit.errors import ConfigError
from mtlkit.train.evaluate import evaluate

L = pytest.importorskip("lightning")
from mtlkit.integrations.lightning import MultiTaskLightningModule  # noqa: E402

TASKS = mk.TaskSet([mk.Task("a", loss="mse"), mk.Task("b", loss="bce")])


def dataset(n: int = 96) -> MultiTaskTensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen)
    return MultiTaskTensorDataset(x, {"a": x[:, 0] - x[:, 1], "b": (x[:, 2] > 0).float()})


def batches():
    return loader(dataset(), batch_size=32)  # no shuffling: both loops see the same batches


def model():
    torch.manual_seed(0)
    return mk.models.create("shared_bottom", in_features=6, tasks=TASKS, bottom_dims=[16], tower_dims=[8])


def lightning_trainer(**kw):
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kw)
    return L.Trainer(**options)


def plain_loop(method_name: str, epochs: int) -> dict[str, torch.Tensor]:
    net = model()
    method = mk.methods.create(method_name)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    driver = mk.methods.Driver(method, net, optimizer, TASKS)
    for _ in range(epochs):
        with driver.epoch():
            for batch in batches():
                optimizer.zero_grad(set_to_none=True)
                out = net(batch.inputs, full_output=True)
                driver.backward(TASKS.losses(out.predictions, batch.targets), out)
                optimizer.step()
                driver.after_step(lambda b=batch: TASKS.losses(net(b.inputs), b.targets))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", ["mgda", "dwa", "famo", "upgrad"])
def test_a_lightning_run_matches_mtlkits_loop(name):
    module = MultiTaskLightningModule(
        model(), TASKS, name, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2)
    )
    lightning_trainer(max_epochs=3).fit(module, batches())
    expected = plain_loop(name, epochs=3)
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)


def test_training_lowers_the_losses_and_logs_them():
    module = MultiTaskLightningModule(
        model(), TASKS, "nash_mtl", optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    before = evaluate(module.model, TASKS, batches(), torch.device("cpu")).losses
    trainer = lightning_trainer(max_epochs=5)
    trainer.fit(module, batches(), batches())
    after = evaluate(module.model, TASKS, batches(), torch.device("cpu")).losses
    assert sum(after.values()) < 0.8 * sum(before.values())
    logged = trainer.logged_metrics
    assert {"train/loss/a_epoch", "train/weight/b_epoch", "val/loss/a"} <= set(logged)


def test_resuming_from_a_lightning_checkpoint_continues_the_method(tmp_path):
    full = MultiTaskLightningModule(model(), TASKS, "famo", optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    lightning_trainer(max_epochs=4).fit(full, batches())
    first = MultiTaskLightningModule(model(), TASKS, "famo", optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    trainer = lightning_trainer(max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(first, batches())
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    resumed = MultiTaskLightningModule(
        model(), TASKS, "famo", optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    lightning_trainer(max_epochs=4).fit(resumed, batches(), ckpt_path=path)
    expected = full.state_dict()
    for key, value in resumed.state_dict().items():  # the model's weights and the method's state
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
        else:
            assert value == expected[key], key


def test_bf16_autocast_trains():
    module = MultiTaskLightningModule(
        model(), TASKS, "mgda", optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    before = evaluate(module.model, TASKS, batches(), torch.device("cpu")).losses
    lightning_trainer(max_epochs=5, precision="bf16-mixed").fit(module, batches())
    after = evaluate(module.model, TASKS, batches(), torch.device("cpu")).losses
    assert sum(after.values()) < sum(before.values())
    assert all(p.dtype == torch.float32 for p in module.model.parameters())


def test_refusals_are_clear():
    with pytest.raises(ConfigError, match="batches per step"):
        MultiTaskLightningModule(model(), TASKS, "modo")
    with pytest.raises(ConfigError, match="TaskSet"):
        MultiTaskLightningModule(model(), ["a", "b"], "ew")  # type: ignore[arg-type]
