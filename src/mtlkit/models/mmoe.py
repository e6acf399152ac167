"""Multi-gate Mixture-of-Experts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import TaskError, unknown_name
from mtlkit.models.base import (
    MultiTaskModule,
    MultiTaskOutput,
    last_weight_layer,
    mlp,
    register,
    resolve_out_features,
)
from mtlkit.models.gating import REPRESENTATIONS, ExpertInputs, shared_cut, softmax_gate_statistics


@register("mmoe")
class MMoE(MultiTaskModule):
    """MMoE (Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018).

    ``e_i = f_i(x)`` for E shared experts; per task a gate ``g_t = softmax(W_t u + b_t)`` and
    ``y_t = h_t(sum_i g_t[i] e_i)``. As in the paper, gates are a single linear layer and softmax
    (torch-rechub's BatchNorm on the gate logits is not used). With one expert the gate is exactly
    1 and the model equals :class:`~mtlkit.models.SharedBottom` with the same weights.

    Args:
        in_features: input width, or the shape of one example (experts read it flattened).
        tasks: the task set (or task names).
        num_experts: number of experts E.
        expert_dims: hidden widths of each expert MLP (the last one is the expert output width).
        tower_dims: hidden widths of each tower; a ``Linear`` to ``out_features`` follows.
        out_features, activation, dropout, batch_norm: as in SharedBottom.
        stem_dims: a shared MLP stem before the experts (the "shared embedding"; (): none).
        gate_input: what the gates read: ``"input"`` (the paper's and LibMTL's choice),
            ``"stem"`` or ``"pooled"`` (:class:`~mtlkit.models.gating.ExpertInputs`).
        representation: ``"stacked"``: the expert outputs (B, E, h), with the gate input when the
            gate reads the stem (then flattened into one (B, ·) tensor); everything after it is
            task-specific, so representation-level methods are exact about what is shared.
            ``"per_task"``: each task's mixture (its tower input), as LibMTL's ``rep_grad``.

    ``last_gates`` holds each task's gate weights (B, E) from the last forward, and
    :meth:`routing_statistics` summarises them for the logs.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        num_experts: int = 8,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        stem_dims: Sequence[int] = (),
        gate_input: str = "input",
        representation: str = "stacked",
    ) -> None:
        super().__init__(tasks)
        name = type(self).__name__
        if num_experts < 1:
            raise TaskError(f"{name} needs at least one expert, got num_experts={num_experts}.")
        if not expert_dims:
            raise TaskError(f"{name} needs at least one expert layer (expert_dims).")
        if representation not in REPRESENTATIONS:
            raise unknown_name("representation", representation, REPRESENTATIONS)
        self.representation = representation
        self.num_experts = num_experts
        self.inputs = ExpertInputs(in_features, stem_dims, gate_input, activation, dropout, batch_norm)
        self.in_features = in_features
        outs = resolve_out_features(self.task_names, out_features)
        width = self.inputs.expert_width
        self.experts = nn.ModuleList(
            [mlp(width, expert_dims, activation, dropout, batch_norm) for _ in range(num_experts)]
        )
        self.gates = self._make_gates(self.inputs.gate_width)
        self.towers = nn.ModuleDict(
            {
                t: mlp(expert_dims[-1], tower_dims, activation, dropout, batch_norm, out_features=outs[t])
                for t in self.task_names
            }
        )
        self.last_gates: dict[str, Tensor] = {}

    def _make_gates(self, gate_width: int) -> nn.ModuleDict:
        return nn.ModuleDict({t: nn.Linear(gate_width, self.num_experts) for t in self.task_names})

    def _gate(self, task: str, gate_in: Tensor, aux: dict[str, Tensor]) -> Tensor:
        """Task ``task``'s expert weights, (B, E) or (E,) for an input-independent gate."""
        return torch.softmax(self.gates[task](gate_in), dim=-1)

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.inputs, self.experts]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.gates[task], self.towers[task]]

    def last_shared_layers(self) -> list[nn.Module]:
        return [last_weight_layer(e) for e in self.experts]

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        self.inputs.check(x, type(self).__name__)
        expert_in, gate_in = self.inputs(x)
        experts = torch.stack([e(expert_in) for e in self.experts], dim=1)  # (B, E, h)
        stacked = self.representation == "stacked"
        z: Tensor | dict[str, Tensor]
        if self.inputs.gate_reads_shared and stacked:
            z, (experts, gate_in) = shared_cut([experts, gate_in])
        else:
            z = experts
        aux: dict[str, Tensor] = {}
        mixed = {}
        self.last_gates.clear()
        for t in tasks:
            gate = self._gate(t, gate_in, aux)
            self.last_gates[t] = gate.detach()
            mixed[t] = torch.einsum("be,beh->bh", gate.expand(experts.shape[0], -1), experts)
        if not stacked:
            z = mixed
        out = {t: self.towers[t](mixed[t]) for t in tasks}
        return MultiTaskOutput(out, z, aux or None)

    def routing_statistics(self) -> dict[str, float]:
        names = [f"expert{i}" for i in range(self.num_experts)]
        return softmax_gate_statistics(self.last_gates, {t: names for t in self.last_gates})
