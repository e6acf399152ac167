"""Diffusion training as multi-task learning over denoising timesteps (ANT: Go, Kim, Lee, Lee, Oh,
Moon, Choi, "Addressing Negative Transfer in Diffusion Models", NeurIPS 2023).

Each interval of timesteps is a task. A batch of clean images becomes one noise-prediction batch
whose samples are split into ``k`` equal chunks, chunk ``j`` drawing its timesteps uniformly from
interval ``j`` (the official stratified sampler); every interval-task reads the same noise target
and is labelled on its chunk only, so any mtlkit method weighs the ``k`` interval losses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.core.intervals import Interval
from mtlkit.core.tasks import Batch, Task, TaskSet
from mtlkit.errors import ConfigError, ShapeMismatchError


@dataclass
class NoiseSchedule:
    """DDPM's linear variance schedule (Ho, Jain, Abbeel, NeurIPS 2020): ``beta_t`` from
    ``beta_start`` to ``beta_end`` over ``num_steps`` steps; ``alpha_bar_t = prod (1 - beta)``,
    ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)``."""

    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.num_steps < 2 or not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"A schedule needs num_steps >= 2 and 0 < beta_start < beta_end < 1; got {self}."
            )
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - betas, dim=0)

    def snr(self) -> np.ndarray:
        ab = self.alpha_bar
        return (ab / (1 - ab)).numpy()

    def noisy(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``."""
        ab = self.alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def interval_name(interval: Interval) -> str:
    return f"t{interval[0]}-{interval[1]}"


def interval_tasks(intervals: Sequence[Interval]) -> TaskSet:
    """One noise-prediction task per interval (MSE on the shared target ``eps``)."""
    _check_intervals(intervals)
    return TaskSet([Task(interval_name(iv), loss="mse", target="eps") for iv in intervals])


def stratified_timesteps(
    intervals: Sequence[Interval], batch_size: int, generator: torch.Generator
) -> Tensor:
    """Timesteps for a batch: ``batch_size / k`` consecutive samples per interval, each drawn
    uniformly from its interval. ``batch_size`` must be a multiple of ``k`` (the official
    sampler's integer division would silently drop samples)."""
    k = len(intervals)
    if batch_size % k:
        raise ShapeMismatchError(f"The batch size {batch_size} must be a multiple of the {k} intervals.")
    per = batch_size // k
    parts = [torch.randint(lo, hi + 1, (per,), generator=generator, dtype=torch.long) for lo, hi in intervals]
    return torch.cat(parts)


class DiffusionLoader:
    """Noise-prediction batches over the interval tasks, from a loader of clean images.

    Each batch of images (``(N, C, H, W)`` in [-1, 1], or ``(images, labels)``) becomes
    ``Batch(inputs={"x": x_t, "t": t}, targets={"eps": noise}, masks={interval: chunk})``. The
    timesteps and the noise come from ``generator``, which the Trainer seeds at every epoch, so
    a resumed run draws the same ones. A last batch whose size is not a multiple of ``k`` is
    dropped.
    """

    def __init__(
        self,
        images: Iterable[Any],
        intervals: Sequence[Interval],
        schedule: NoiseSchedule,
        seed: int = 0,
    ) -> None:
        _check_intervals(intervals, schedule.num_steps)
        self.images = images
        self.intervals = list(intervals)
        self.schedule = schedule
        self.tasks = interval_tasks(self.intervals)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        k = len(self.intervals)
        for item in self.images:
            x0 = item[0] if isinstance(item, (tuple, list)) else item
            n = (x0.shape[0] // k) * k
            if n == 0:
                continue
            x0 = x0[:n]
            t = stratified_timesteps(self.intervals, n, self.generator)
            noise = torch.randn(x0.shape, generator=self.generator, dtype=x0.dtype)
            chunk = torch.arange(n) // (n // k)
            masks = {task.name: chunk == j for j, task in enumerate(self.tasks)}
            yield Batch({"x": self.schedule.noisy(x0, t, noise), "t": t}, {"eps": noise}, masks)


def _check_intervals(intervals: Sequence[Interval], num_steps: int | None = None) -> None:
    ivs = list(intervals)
    if not ivs:
        raise ConfigError("At least one timestep interval is needed.")
    if ivs[0][0] != 0 or any(b[0] != a[1] + 1 for a, b in pairwise(ivs)):
        raise ConfigError(f"The intervals must be contiguous from 0, got {ivs}.")
    if any(lo > hi for lo, hi in ivs):
        raise ConfigError(f"An interval ends before it starts: {ivs}.")
    if num_steps is not None and ivs[-1][1] != num_steps - 1:
        raise ConfigError(f"The intervals end at {ivs[-1][1]}; the schedule has {num_steps} steps.")
