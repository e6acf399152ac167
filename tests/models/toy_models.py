"""Small models whose shared/task split is not a tree, for contract and engine tests."""

from __future__ import annotations

import torch
from torch import nn

from mtlkit.models import MultiTaskModule, MultiTaskOutput


class CrossTaskHead(MultiTaskModule):
    """A trunk, a ``pair`` layer that feeds tasks ``a`` and ``b`` (listed under both) and a tower
    per task: the split is not a tree. ``mislabelled=True`` lists ``pair`` under ``a`` only."""

    def __init__(self, in_features: int = 5, width: int = 4, mislabelled: bool = False) -> None:
        super().__init__(["a", "b", "c"])
        self.mislabelled = mislabelled
        self.trunk = nn.Sequential(nn.Linear(in_features, width), nn.Tanh())
        self.pair = nn.Linear(width, width)
        self.towers = nn.ModuleDict({t: nn.Linear(width, 1) for t in self.task_names})

    def shared_modules(self):
        return [self.trunk]

    def task_modules(self, task):
        readers = ("a",) if self.mislabelled else ("a", "b")
        return [self.towers[task], *([self.pair] if task in readers else [])]

    def forward_tasks(self, x, tasks):
        z = self.trunk(x)
        p = torch.tanh(self.pair(z))
        inputs = {"a": p, "b": p + z, "c": z}
        return MultiTaskOutput({t: self.towers[t](inputs[t]).squeeze(-1) for t in tasks}, z)


class PerTaskRepresentation(MultiTaskModule):
    """Two shared experts mixed by a gate per task (as in the last level of PLE): each task reads
    its own mixture, so the representation is ``{task: tensor}``."""

    def __init__(self, in_features: int = 5, width: int = 4, tasks=("a", "b", "c")) -> None:
        super().__init__(list(tasks))
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(in_features, width), nn.Tanh()) for _ in range(2)]
        )
        self.gates = nn.ModuleDict({t: nn.Linear(in_features, 2) for t in self.task_names})
        self.towers = nn.ModuleDict({t: nn.Linear(width, 1) for t in self.task_names})
        self.leak = False  # make task b read task a's representation (a contract violation)

    def shared_modules(self):
        return [self.experts]

    def task_modules(self, task):
        return [self.gates[task], self.towers[task]]

    def forward_tasks(self, x, tasks):
        e = torch.stack([f(x) for f in self.experts], dim=1)
        z = {t: torch.einsum("be,beh->bh", torch.softmax(self.gates[t](x), -1), e) for t in self.task_names}
        out = {t: self.towers[t](z[t] + (z["a"] if self.leak and t == "b" else 0)).squeeze(-1) for t in tasks}
        return MultiTaskOutput(out, z)
