"""The synthetic two-task regression data of the MMoE paper, with controlled task correlation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import DATASETS, MultiTaskTensorDataset


@dataclass
class SyntheticSplits:
    train: MultiTaskTensorDataset
    val: MultiTaskTensorDataset
    test: MultiTaskTensorDataset
    tasks: TaskSet
    in_features: int


def mmoe_synthetic(
    n: int = 10_000,
    correlation: float = 0.5,
    dim: int = 100,
    num_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y1, y2)`` from the generator of Ma et al., "Modeling Task Relationships in Multi-task
    Learning with Multi-gate Mixture-of-Experts", KDD 2018, §4.2.

    ``u1, u2`` are orthonormal in R^dim; ``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p^2) u2)`` so that
    the cosine of the two weight vectors is exactly ``p`` (the paper's correlation knob);
    ``x ~ N(0, I)``; ``y_t = w_t.x + sum_j sin(alpha_j w_t.x + beta_j) + eps`` with
    ``alpha_j, beta_j ~ N(0, 1)`` shared by both tasks and ``eps ~ N(0, noise_std^2)`` (the paper's
    N(0, 0.01) variance). Seeded by ``seed`` alone.
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [-1, 1], got {correlation}.")
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
    u1, u2 = basis[:, 0], basis[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + math.sqrt(1.0 - correlation**2) * u2)
    alpha = torch.randn(num_sines, generator=gen, dtype=torch.float64)
    beta = torch.randn(num_sines, generator=gen, dtype=torch.float64)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)

    def target(w: torch.Tensor) -> torch.Tensor:
        s = x @ w
        return (
            s
            + torch.sin(alpha[None, :] * s[:, None] + beta[None, :]).sum(1)
            + noise_std * torch.randn(n, generator=gen, dtype=torch.float64)
        )

    return x.float(), target(w1).float(), target(w2).float()


@DATASETS.register("mmoe_synthetic")
def load_mmoe_synthetic(
    n_train: int = 8_000,
    n_val: int = 1_000,
    n_test: int = 1_000,
    correlation: float = 0.5,
    dim: int = 100,
    seed: int = 0,
) -> SyntheticSplits:
    """Train/val/test splits of :func:`mmoe_synthetic` as multi-task datasets (tasks y1, y2; MSE)."""
    n = n_train + n_val + n_test
    x, y1, y2 = mmoe_synthetic(n=n, correlation=correlation, dim=dim, seed=seed)
    data = MultiTaskTensorDataset(x, {"y1": y1, "y2": y2})
    cuts = torch.arange(n)
    tasks = TaskSet(
        [Task("y1", loss="mse", metrics=["mse", "r2"]), Task("y2", loss="mse", metrics=["mse", "r2"])]
    )
    return SyntheticSplits(
        train=data.subset(cuts[:n_train]),
        val=data.subset(cuts[n_train : n_train + n_val]),
        test=data.subset(cuts[n_train + n_val :]),
        tasks=tasks,
        in_features=dim,
    )
