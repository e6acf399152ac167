"""A sparse top-k mixture-of-experts trunk for multi-task models (MENTOR's MoE backbone)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.models.base import (
    MultiTaskModule,
    MultiTaskOutput,
    check_input,
    mlp,
    register,
    resolve_out_features,
)
from mtlkit.models.moe import NoisyTopKRouter, load_statistics


@register("sparse_moe")
class SparseMoE(MultiTaskModule):
    """The MoE backbone of MENTOR (Huang et al., "MENTOR: Mixture-of-Experts Network with
    Task-Oriented Perturbation for Visual Reinforcement Learning", ICML 2025) as a multi-task
    trunk: ``num_experts`` MLP experts (``in_features -> expert_dims``), each input served by its
    ``top_k`` experts with gates softmax-normalised over the kept ones (the top-k of the router's
    softmax, renormalised); heads per task on the mixture. The router reads the input, and with
    ``task_embedding`` a learned embedding of the task too (one trunk pass per task, as MENTOR's
    multi-task use); otherwise one pass serves every task. ``aux_weight`` adds the balancing loss
    ``cv^2(importance) + cv^2(load)`` (MENTOR's use of one is unconfirmed; default 0).
    MENTOR's defaults: 8 experts, top-4. Its task-oriented perturbation is the Trainer callback
    :class:`~mtlkit.train.SnapshotPerturbation`. Departures: the RL stack is out of scope; the
    experts are MLPs on the model's input.
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 1,
        num_experts: int = 8,
        top_k: int = 4,
        expert_dims: Sequence[int] = (32,),
        tower_dims: Sequence[int] = (),
        task_embedding: int = 0,
        aux_weight: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        if not expert_dims or aux_weight < 0 or task_embedding < 0:
            raise ConfigError("sparse_moe needs expert_dims, aux_weight >= 0 and task_embedding >= 0.")
        self.in_features, self.task_embedding, self.aux_weight = in_features, task_embedding, aux_weight
        self.experts = nn.ModuleList([mlp(in_features, expert_dims, "relu") for _ in range(num_experts)])
        width = expert_dims[-1]
        self.router = NoisyTopKRouter(in_features + task_embedding, num_experts, top_k, renormalize=True)
        self.embedding = nn.Embedding(len(self.task_names), task_embedding) if task_embedding else None
        outs = resolve_out_features(self.task_names, out_features)
        self.heads = nn.ModuleDict(
            {t: mlp(width, tower_dims, "relu", out_features=outs[t]) for t in self.task_names}
        )
        self.last_load: dict[str, Tensor] = {}

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.experts, self.router] + ([self.embedding] if self.embedding is not None else [])

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.heads[task]]

    def mixture(self, x: Tensor, task: str | None = None) -> tuple[Tensor, Tensor]:
        """The experts' mixture for ``x`` (routed for ``task`` with a task embedding) and the
        router's balancing loss."""
        inputs = x
        if self.embedding is not None:
            if task is None:
                raise ConfigError("A sparse_moe with a task embedding routes per task: give the task.")
            e = self.embedding.weight[self.task_names.index(task)]
            inputs = torch.cat([x, e.expand(len(x), -1)], dim=1)
        routing = self.router(inputs)
        gates = torch.zeros(len(x), len(self.experts), dtype=x.dtype, device=x.device)
        gates = gates.scatter(1, routing.indices, routing.gates.to(x.dtype))
        out = x.new_zeros(len(x), 0)
        for e in torch.unique(routing.indices).tolist():
            rows = gates[:, e].nonzero().squeeze(1)
            y = self.experts[e](x[rows]) * gates[rows, e : e + 1]
            out = y.new_zeros(len(x), y.shape[1]) if out.shape[1] == 0 else out
            out = out.index_add(0, rows, y)
        self.last_load[task or "all"] = routing.load.detach()
        return out, routing.loss

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        check_input(x, self.in_features, "SparseMoE")
        aux: dict[str, Tensor] = {}
        if self.embedding is None:
            z, balance = self.mixture(x)
            if self.training and self.aux_weight:
                aux["moe_balance"] = self.aux_weight * balance
            return MultiTaskOutput({t: self.heads[t](z) for t in tasks}, z, aux or None)
        predictions, reps = {}, {}
        for t in tasks:
            reps[t], balance = self.mixture(x, t)
            predictions[t] = self.heads[t](reps[t])
            if self.training and self.aux_weight:
                aux[f"moe_balance/{t}"] = self.aux_weight * balance
        return MultiTaskOutput(predictions, reps, aux or None)

    def routing_statistics(self) -> dict[str, float]:
        """Per routing (task, or ``all``): the share of experts used and the largest expert's share."""
        return load_statistics(self.last_load, self.router.top_k)
