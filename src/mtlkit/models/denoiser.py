"""A small timestep-conditioned U-Net noise predictor whose tasks are denoising-timestep intervals
(ANT's view of diffusion training as multi-task learning)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ShapeMismatchError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=1)


class _Block(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the timestep embedding as a per-channel bias."""

    def __init__(self, channels_in: int, channels_out: int, time_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels_in), channels_in)
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.time = nn.Linear(time_dim, channels_out)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(torch.nn.functional.silu(self.norm(x))) + self.time(emb)[:, :, None, None]


class TimestepDenoiser(MultiTaskModule):
    """A two-level U-Net ``eps_theta(x_t, t)`` for small images (28 x 28 Fashion-MNIST on a CPU).

    Every task is an interval of timesteps and reads the same prediction (the noise), so every
    parameter is shared and the representation is the prediction itself. Inputs are
    ``{"x": x_t (B, C, H, W), "t": timesteps (B,)}`` as :class:`~mtlkit.data.diffusion.DiffusionLoader`
    yields them; H and W must be divisible by 4.

    Args:
        tasks: the interval tasks (:func:`~mtlkit.data.diffusion.interval_tasks`).
        image_channels: channels of the images.
        width: channels of the first level (the second has twice as many).
        time_dim: width of the timestep embedding.
    """

    def __init__(
        self,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        image_channels: int = 1,
        width: int = 32,
        time_dim: int = 64,
    ) -> None:
        super().__init__(tasks)
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(image_channels, width, 3, padding=1)
        self.down1 = _Block(width, width, time_dim)
        self.pool1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.down2 = _Block(2 * width, 2 * width, time_dim)
        self.pool2 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.mid = _Block(2 * width, 2 * width, time_dim)
        self.up2 = nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1)
        self.dec2 = _Block(4 * width, 2 * width, time_dim)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.dec1 = _Block(2 * width, width, time_dim)
        self.out = nn.Conv2d(width, image_channels, 3, padding=1)

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return []

    def forward_tasks(self, x: Any, tasks: list[str]) -> MultiTaskOutput:
        if not isinstance(x, Mapping) or "x" not in x or "t" not in x:
            raise ShapeMismatchError("TimestepDenoiser takes {'x': noisy images, 't': timesteps}.")
        images, t = x["x"], x["t"]
        if images.dim() != 4 or images.shape[-1] % 4 or images.shape[-2] % 4:
            raise ShapeMismatchError(
                f"TimestepDenoiser expects images (B, C, H, W) with H, W divisible by 4; got {tuple(images.shape)}."
            )
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(images.dtype))
        h1 = self.down1(self.stem(images), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid(self.pool2(h2), emb)
        h = self.dec2(torch.cat([self.up2(h), h2], dim=1), emb)
        h = self.dec1(torch.cat([self.up1(h), h1], dim=1), emb)
        eps = self.out(h)
        return MultiTaskOutput({task: eps for task in tasks}, eps)
