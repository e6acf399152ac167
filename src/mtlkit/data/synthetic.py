"""Synthetic multi-task data: the MMoE paper's two-task regression with controlled task correlation,
and a two-modality regression with a built-in modality bias (FULLER)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import DATASETS, MultiTaskTensorDataset
from mtlkit.errors import ConfigError


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


@dataclass
class ModalitySplits(SyntheticSplits):
    """Synthetic splits whose inputs concatenate modalities of the widths ``modality_dims``."""

    modality_dims: list[int] = field(default_factory=list)


@DATASETS.register("modality_bias")
def load_modality_bias(
    n_train: int = 4_000,
    n_val: int = 1_000,
    n_test: int = 1_000,
    dims: tuple[int, int] = (8, 8),
    scales: tuple[float, float] = (10.0, 0.1),
    weak_share: float = 0.3,
    noise: float = 0.05,
    seed: int = 0,
) -> ModalitySplits:
    """Two modalities with a built-in modality bias (FULLER's setting, Huang et al., ICCV 2023, as
    a generator): a strong modality ``x_a`` of large scale that explains most of each target and a
    weak one ``x_b`` of small scale that explains ``weak_share`` of it; two regression tasks.

    ``y_t = (1 - weak_share) f_t(x_a / s_a) + weak_share g_t(x_b / s_b) + noise`` with random
    two-layer tanh features ``f_t``, ``g_t`` (one per task), so both modalities carry signal for
    both tasks but the weak one's gradients are small and a jointly trained network learns it
    late. The inputs are ``[x_a, x_b]`` (``modality_dims``, for
    :class:`~mtlkit.models.ModalityFusion`); evaluation with ``x_a`` zeroed measures how much a
    model learned from the weak modality.
    """
    if not 0 <= weak_share <= 1:
        raise ConfigError(f"weak_share must lie in [0, 1], got {weak_share}.")
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_val + n_test
    da, db = dims
    za, zb = torch.randn(n, da, generator=gen), torch.randn(n, db, generator=gen)

    def feature(z: Tensor) -> Tensor:
        w1 = torch.randn(z.shape[1], 16, generator=gen) / z.shape[1] ** 0.5
        w2 = torch.randn(16, generator=gen) / 4
        out = torch.tanh(z @ w1) @ w2
        return (out - out.mean()) / out.std()

    targets = {}
    for t in ("y1", "y2"):
        clean = (1 - weak_share) * feature(za) + weak_share * feature(zb)
        targets[t] = clean + noise * torch.randn(n, generator=gen)
    x = torch.cat([za * scales[0], zb * scales[1]], dim=1)
    data = MultiTaskTensorDataset(x, targets)
    cuts = torch.arange(n)
    tasks = TaskSet([Task(t, loss="mse", metrics=["mse", "r2"]) for t in ("y1", "y2")])
    return ModalitySplits(
        train=data.subset(cuts[:n_train]),
        val=data.subset(cuts[n_train : n_train + n_val]),
        test=data.subset(cuts[n_train + n_val :]),
        tasks=tasks,
        in_features=da + db,
        modality_dims=[da, db],
    )
