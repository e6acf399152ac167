"""Multi-gate Mixture-of-Experts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import TaskError
from mtlkit.models.base import (
    MultiTaskModule,
    MultiTaskOutput,
    check_input,
    last_weight_layer,
    mlp,
    register,
    resolve_out_features,
)


@register("mmoe")
class MMoE(MultiTaskModule):
    """MMoE (Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018).

    ``e_i = f_i(x)`` for E shared experts; per task a gate ``g_t = softmax(W_t x + b_t)`` and
    ``y_t = h_t(sum_i g_t[i] e_i)``. As in the paper, gates are a single linear layer on the input
    and softmax (torch-rechub's BatchNorm on the gate logits is not used). With one expert the gate
    is exactly 1 and the model equals :class:`~mtlkit.models.SharedBottom` with the same weights.

    Args:
        in_features: input width.
        tasks: the task set (or task names).
        num_experts: number of experts E.
        expert_dims: hidden widths of each expert MLP (the last one is the expert output width).
        tower_dims: hidden widths of each tower; a ``Linear`` to ``out_features`` follows.
        out_features, activation, dropout, batch_norm: as in SharedBottom.

    The representation is the stack of expert outputs (B, E, h): everything after it (gates,
    towers) is task-specific, so representation-level methods are exact about what is shared.
    ``last_gates`` holds each task's gate weights (B, E) from the last forward.
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        num_experts: int = 8,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(tasks)
        if num_experts < 1:
            raise TaskError(f"MMoE needs at least one expert, got num_experts={num_experts}.")
        if not expert_dims:
            raise TaskError("MMoE needs at least one expert layer (expert_dims).")
        self.in_features = in_features
        self.num_experts = num_experts
        outs = resolve_out_features(self.task_names, out_features)
        self.experts = nn.ModuleList(
            [mlp(in_features, expert_dims, activation, dropout, batch_norm) for _ in range(num_experts)]
        )
        self.gates = nn.ModuleDict({t: nn.Linear(in_features, num_experts) for t in self.task_names})
        self.towers = nn.ModuleDict(
            {
                t: mlp(expert_dims[-1], tower_dims, activation, dropout, batch_norm, out_features=outs[t])
                for t in self.task_names
            }
        )
        self.last_gates: dict[str, Tensor] = {}

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.experts]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.gates[task], self.towers[task]]

    def last_shared_layers(self) -> list[nn.Module]:
        return [last_weight_layer(e) for e in self.experts]

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        check_input(x, self.in_features, type(self).__name__)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, h)
        out = {}
        for t in tasks:
            gate = torch.softmax(self.gates[t](x), dim=-1)  # (B, E)
            self.last_gates[t] = gate.detach()
            mixed = torch.einsum("be,beh->bh", gate, experts)
            out[t] = self.towers[t](mixed)
        return MultiTaskOutput(out, experts)
