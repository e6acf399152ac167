"""ANT's O1 on a toy (the spec's test 3): gradient affinity across timesteps decays with the gap
between noise levels, for a small denoiser trained briefly on 1-D-structured images."""

from __future__ import annotations

import numpy as np
import torch

import mtlkit as mk
from mtlkit.core.intervals import uniform_intervals


def test_affinity_falls_with_the_gap_between_noise_levels():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # images from a two-component mixture (a bright and a dark square), 8 x 8
    centres = torch.where(torch.rand(64, 1, 1, 1, generator=gen) < 0.5, 0.8, -0.8)
    images = (centres + 0.1 * torch.randn(64, 1, 8, 8, generator=gen)).clamp(-1, 1)
    schedule = mk.data.NoiseSchedule()
    loader = mk.data.DiffusionLoader(
        [images[:40], images[40:60]], uniform_intervals(1000, 5), schedule, seed=0
    )
    model = mk.models.TimestepDenoiser(loader.tasks, width=8, time_dim=16)
    mk.Trainer(model, loader.tasks, "ew", device="cpu", progress=False).fit(loader, epochs=10)
    steps = [0, 100, 250, 400, 550, 700, 850, 999]
    a = mk.relatedness.timestep_affinity(model, [images[:32]], schedule, steps)
    assert a.shape == (8, 8) and np.allclose(np.diag(a), 1.0)
    rho, _, means = mk.relatedness.affinity_decay(a, steps)
    assert rho < -0.2  # O1: the further apart two noise levels, the less their gradients agree (random: ~0)
    assert means[0] > means[-1]
