"""ANT's data side: the noise schedule, stratified timesteps (the spec's B = 50, k = 5 test), and
interval tasks labelled on their chunk only."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.core.intervals import uniform_intervals
from mtlkit.data.diffusion import stratified_timesteps
from mtlkit.errors import ConfigError, ShapeMismatchError


def test_each_chunk_draws_from_its_interval():
    intervals = uniform_intervals(1000, 5)
    t = stratified_timesteps(intervals, 50, torch.Generator().manual_seed(0))
    for j, (lo, hi) in enumerate(intervals):
        chunk = t[10 * j : 10 * (j + 1)]
        assert len(chunk) == 10 and bool(((chunk >= lo) & (chunk <= hi)).all())
    with pytest.raises(ShapeMismatchError, match="multiple"):
        stratified_timesteps(intervals, 48, torch.Generator())


def test_the_schedule_and_the_noisy_images():
    schedule = mk.data.NoiseSchedule()
    snr = schedule.snr()
    assert snr.shape == (1000,) and (snr[1:] < snr[:-1]).all()
    assert float(schedule.alpha_bar[-1]) == pytest.approx(4.04e-5, rel=0.01)  # DDPM's linear schedule
    x0, noise = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    xt = schedule.noisy(x0, torch.tensor([0, 999]), noise)
    assert float(xt[0].mean()) == pytest.approx(float(schedule.alpha_bar[0].sqrt()))


def test_interval_losses_are_the_chunk_means_and_every_method_can_weigh_them():
    intervals = uniform_intervals(1000, 5)
    images = [torch.rand(20, 1, 8, 8) * 2 - 1]
    loader = mk.data.DiffusionLoader(images, intervals, mk.data.NoiseSchedule(), seed=0)
    batch = next(iter(loader))
    model = mk.models.TimestepDenoiser(loader.tasks, width=8, time_dim=16)
    out = model(batch.inputs)
    losses = loader.tasks.losses(out, batch.targets, batch.masks)
    eps = next(iter(out.values()))
    for j, name in enumerate(loader.tasks.names):
        rows = slice(4 * j, 4 * (j + 1))
        expected = torch.nn.functional.mse_loss(eps[rows], batch.targets["eps"][rows])
        torch.testing.assert_close(losses[name], expected)
    assert losses.labelled.tolist() == [4 * 64] * 5
    with pytest.raises(ConfigError, match="contiguous"):
        mk.data.DiffusionLoader(images, [(0, 10), (12, 999)], mk.data.NoiseSchedule())


@pytest.mark.parametrize("name", ["ew", "uw", "pcgrad", "nash_mtl"])
def test_ant_trains_a_denoiser_with_per_interval_methods(name):
    intervals = uniform_intervals(1000, 5)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(10, 1, 8, 8, generator=gen) * 2 - 1 for _ in range(3)]
    loader = mk.data.DiffusionLoader(images, intervals, mk.data.NoiseSchedule(), seed=0)
    torch.manual_seed(0)
    model = mk.models.TimestepDenoiser(loader.tasks, width=8, time_dim=16)
    trainer = mk.Trainer(model, loader.tasks, name, device="cpu", progress=False)
    trainer.fit(loader, epochs=2)
    assert trainer.step == 6 and all(torch.isfinite(p).all() for p in model.parameters())
