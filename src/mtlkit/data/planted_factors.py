"""Test beds of the dual encoder with a known answer: tasks on a planted shared factor space, and
tasks whose shared-factor coefficients form planted clusters."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import MultiTaskTensorDataset


def planted_factor_tasks(
    seed: int = 0, tasks: int = 5, features: int = 10, shared: int = 2, outputs: int = 3, n: int = 2000
) -> tuple[MultiTaskTensorDataset, TaskSet, Tensor]:
    """``(data, tasks, shared basis)``: task k's ``outputs`` targets are ``M_k x + noise`` with
    ``M_k = B_k A_s + u_k a_k^T``, a ``shared``-dimensional factor space (the rows of the returned
    ``A_s``) and one own direction ``a_k`` per task, orthonormal to it and to each other. With more
    outputs than own directions, a model fits every task only if its shared encoder spans ``A_s``."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=g))
    a_s, own = basis[:, :shared].T, basis[:, shared : shared + tasks].T
    names = [f"t{k}" for k in range(tasks)]
    x = torch.randn(n, features, generator=g)
    targets = {}
    for k, t in enumerate(names):
        m = (
            torch.randn(outputs, shared, generator=g) @ a_s
            + torch.randn(outputs, 1, generator=g) @ own[k : k + 1]
        )
        targets[t] = x @ m.T + 0.05 * torch.randn(n, outputs, generator=g)
    return MultiTaskTensorDataset(x, targets), TaskSet([Task(t, "mse") for t in names]), a_s


def clustered_coefficients(
    seed: int = 0, tasks: int = 6, q: int = 5, shared: int = 3, n: int = 80
) -> tuple[list[Tensor], list[Tensor]]:
    """Factors (n x q, float64) and targets of ``tasks`` tasks in two planted clusters: the first
    half shares one set of ``shared``-factor coefficients, the second half another; the other
    coefficients are each task's own, and every target has an intercept of 0.5."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, shared, generator=g, dtype=torch.float64)
    factors, targets = [], []
    for k in range(tasks):
        z = torch.randn(n, q, generator=g, dtype=torch.float64)
        beta = torch.cat([centres[k * 2 // tasks], torch.randn(q - shared, generator=g, dtype=torch.float64)])
        factors.append(z)
        targets.append(z @ beta + 0.5 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    return factors, targets
