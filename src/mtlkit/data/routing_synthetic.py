"""A two-modality, two-task regression whose informative modality changes from sample to sample:
the test bed of per-sample routing (``LearningToRoute``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import MultiTaskTensorDataset
from mtlkit.errors import ConfigError


@dataclass
class RoutingSynthetic:
    """The data and what a router should find in it: per sample, whether the first modality
    carries the signal (``informative_first``) and whether it is in the subgroup whose two
    targets are identical (``same_targets``; always False without ``shared_groups``)."""

    data: MultiTaskTensorDataset
    tasks: TaskSet
    modality_dims: tuple[int, int]
    informative_first: Tensor
    same_targets: Tensor


def routing_synthetic(
    n: int,
    seed: int = 0,
    dims: tuple[int, int] = (16, 8),
    noise_scale: float = 0.25,
    missing: float = 0.2,
    shared_groups: bool = False,
) -> RoutingSynthetic:
    """``n`` samples of two modalities (say text embedding and numeric features, widths ``dims``).

    Half the samples carry the signal in the first modality, half in the second; the other
    modality is then noise at ``noise_scale`` of the informative one's scale (so the informative
    modality is recoverable from the input, not given). Targets ``y_t = tanh(2 w_t . x_inf) +
    N(0, 0.05^2)`` with one fixed ``w_t`` per task and modality. A share ``missing`` of the samples
    loses its uninformative modality (all NaN). With ``shared_groups`` a visible subgroup (the last
    feature of each modality shifted by 2) has ``y_2 = y_1``; for the others the targets differ.
    """
    if n < 1 or not 0 <= missing < 1 or not 0 < noise_scale < 1:
        raise ConfigError(
            f"routing_synthetic needs n >= 1, 0 <= missing < 1, 0 < noise_scale < 1; got {n}, {missing}, {noise_scale}."
        )
    g = torch.Generator().manual_seed(seed)
    d1, d2 = dims
    first = torch.rand(n, generator=g) < 0.5
    x1, x2 = torch.randn(n, d1, generator=g), torch.randn(n, d2, generator=g)
    x1[~first] *= noise_scale
    x2[first] *= noise_scale
    fixed = torch.Generator().manual_seed(1234)  # the same regression in every draw
    w1, w2 = torch.randn(2, d1, generator=fixed) / d1**0.5, torch.randn(2, d2, generator=fixed) / d2**0.5
    y = torch.tanh(2 * torch.where(first[:, None], x1 @ w1.T, x2 @ w2.T)) + 0.05 * torch.randn(
        n, 2, generator=g
    )
    group = torch.rand(n, generator=g) < 0.5
    if shared_groups:  # a visible marker of the subgroup; the targets do not depend on it
        x1[:, -1] += 2.0 * group
        x2[:, -1] += 2.0 * group
    same = group & shared_groups
    y[:, 1] = torch.where(same, y[:, 0], y[:, 1])
    drop = torch.rand(n, generator=g) < missing
    x1[drop & ~first] = float("nan")
    x2[drop & first] = float("nan")
    tasks = TaskSet([Task("y1"), Task("y2")])
    data = MultiTaskTensorDataset(torch.cat([x1, x2], dim=1), {"y1": y[:, 0], "y2": y[:, 1]})
    return RoutingSynthetic(data, tasks, (d1, d2), first, same)
