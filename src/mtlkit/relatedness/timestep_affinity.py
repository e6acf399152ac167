"""Task affinity between denoising timesteps (ANT's O1: Go et al., NeurIPS 2023).

``A[i, j]`` is the cosine between the model's full gradient of the noise-prediction loss at
timestep ``t_i`` and at ``t_j``, each accumulated over the same images with the same noise (the
official task-affinity score). The per-timestep gradients come from the gradient engine, one
batch of images at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from mtlkit.core.engine import GradientEngine
from mtlkit.data.diffusion import NoiseSchedule
from mtlkit.errors import ConfigError, EmptyDataError


def timestep_affinity(
    model: nn.Module,
    images: Iterable[Tensor],
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    seed: int = 0,
    engine: GradientEngine | None = None,
) -> np.ndarray:
    """The ``m x m`` gradient-cosine matrix between the ``m`` ``timesteps``.

    ``model`` is a noise predictor taking ``{"x": x_t, "t": t}`` and returning ``{task: eps}``
    (every task reads the same prediction, as :class:`~mtlkit.models.TimestepDenoiser` does);
    ``images`` yields batches of clean images (or ``(images, labels)``). Each image gets one noise
    draw, shared by all timesteps, so the gradients differ only by the noise level.
    """
    ts = [int(t) for t in timesteps]
    if len(ts) < 2 or any(not 0 <= t < schedule.num_steps for t in ts):
        raise ConfigError(f"timesteps must be at least two steps in [0, {schedule.num_steps}); got {ts}.")
    engine = engine or GradientEngine(strategy="loop")
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    total: Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        for item in images:
            x0 = item[0] if isinstance(item, (tuple, list)) else item
            noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
            losses = []
            for t in ts:
                steps = torch.full((x0.shape[0],), t, dtype=torch.long)
                out = model({"x": schedule.noisy(x0, steps, noise), "t": steps})
                eps = next(iter(out.values()))
                losses.append(torch.nn.functional.mse_loss(eps, noise, reduction="sum"))
            rows = engine.jacobian(losses, params).rows().double()
            total = rows.clone() if total is None else total + rows
    finally:
        model.train(was_training)
    if total is None:
        raise EmptyDataError("No image batch was given to estimate the timestep affinity.")
    unit = total / total.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (unit @ unit.T).numpy()


def affinity_decay(affinity: np.ndarray, timesteps: Sequence[int]) -> tuple[float, np.ndarray, np.ndarray]:
    """How affinity falls with the gap between noise levels: the Spearman correlation between
    ``|t_i - t_j|`` and ``A[i, j]`` over the pairs ``i < j`` (negative: O1 holds), and the mean
    affinity per distinct gap (gaps, means)."""
    ts = np.asarray(timesteps)
    i, j = np.triu_indices(len(ts), k=1)
    gaps = np.abs(ts[i] - ts[j])
    values = np.asarray(affinity)[i, j]
    rho = float(spearmanr(gaps, values).statistic)
    unique = np.unique(gaps)
    return rho, unique, np.array([values[gaps == g].mean() for g in unique])
