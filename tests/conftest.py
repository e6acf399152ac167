"""Shared fixtures: small float64 multi-task problems for exact comparisons."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_problem(k: int = 3, batch: int = 6, in_features: int = 5, dtype=torch.float64, model: str = "sb"):
    """A SharedBottom/MMoE/ModalityFusion model in ``dtype`` with K regression tasks and its losses."""
    tasks = mk.TaskSet([mk.Task(f"t{i}", loss="mse") for i in range(k)])
    if model == "sb":
        net = mk.models.SharedBottom(in_features, tasks, bottom_dims=[7, 4], tower_dims=[3])
    elif model == "modality":  # two modalities meeting at a gradient calibration (FULLER)
        net = mk.models.ModalityFusion(in_features, tasks, encoder_dims=[4], trunk_dims=[4], tower_dims=[3])
    else:
        net = mk.models.MMoE(in_features, tasks, num_experts=3, expert_dims=[4], tower_dims=[3])
    net = net.to(dtype)
    x = torch.randn(batch, in_features, dtype=dtype)
    y = {f"t{i}": torch.randn(batch, dtype=dtype) for i in range(k)}
    # more batches of the same problem, for methods that use several per step (MoDo, SDMGrad)
    gen = torch.Generator().manual_seed(k * 1000 + batch)
    net.more_batches = [
        (
            torch.randn(batch, in_features, generator=gen, dtype=dtype),
            {n: torch.randn(batch, generator=gen, dtype=dtype) for n in y},
        )
        for _ in range(2)
    ]
    return tasks, net, x, y
