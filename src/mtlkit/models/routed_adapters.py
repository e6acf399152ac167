"""A multi-task model made of a frozen backbone with Poly/MHR routed LoRA adapters and task heads."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.models.adapters import RoutedLoRALinear, add_routed_adapters, set_task
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, mlp, register, resolve_out_features


@register("routed_adapters")
class RoutedAdapters(MultiTaskModule):
    """A backbone whose linear layers carry Poly/MHR routed LoRA skills
    (:mod:`mtlkit.models.adapters`), run once per task with that task's routing; each task's head
    reads its pass's features (``representation`` is ``{task: features}``).

    Args:
        in_features: input width (for the default backbone).
        tasks: the task set.
        backbone: a module mapping the input to ``features``-wide vectors (a pretrained encoder);
            default: a ReLU MLP ``in_features -> hidden_dims`` with fresh weights (for tests and
            tabular data). Its weights are frozen; only the skills, the routing and the heads train
            (with ``train_backbone=True`` the backbone's other parameters train too, as shared ones).
        features: the backbone's output width (default: the last of ``hidden_dims``).
        select: which ``nn.Linear`` layers of the backbone get adapters (default: every one
            that can be wrapped, see :func:`~mtlkit.models.adapters.add_routed_adapters`).
        skills, rank, heads, alpha, mixing: the adapters' options (Poly: ``heads=1``; MHR: more).
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 1,
        backbone: nn.Module | None = None,
        features: int | None = None,
        hidden_dims: Sequence[int] = (32, 32),
        select: Callable[[str, nn.Linear], bool] | None = None,
        skills: int = 8,
        rank: int = 1,
        heads: int = 1,
        alpha: float | None = None,
        mixing: str = "parameters",
        train_backbone: bool = False,
    ) -> None:
        super().__init__(tasks)
        if backbone is None:
            if not hidden_dims:
                raise ConfigError("routed_adapters: the default backbone needs hidden_dims.")
            backbone = mlp(in_features, hidden_dims, "relu")
            features = hidden_dims[-1]
        if features is None:
            raise ConfigError("routed_adapters: give the backbone's output width as features=.")
        self.in_features = in_features
        for p in backbone.parameters():
            p.requires_grad_(train_backbone)
        self.backbone = backbone
        self.adapted: list[RoutedLoRALinear] = add_routed_adapters(
            backbone,
            self.task_names,
            select,
            skills=skills,
            rank=rank,
            heads=heads,
            alpha=alpha,
            mixing=mixing,
        )
        outs = resolve_out_features(self.task_names, out_features)
        self.heads = nn.ModuleDict({t: nn.Linear(features, outs[t]) for t in self.task_names})

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.backbone]

    def shared_parameters(self) -> list[nn.Parameter]:
        routing = {id(p) for layer in self.adapted for p in layer.routing.parameters()}
        return [p for p in self.backbone.parameters() if p.requires_grad and id(p) not in routing]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.heads[task]]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        own = super().task_parameters()
        for t in self.task_names:
            own[t] += [layer.routing[t] for layer in self.adapted if layer.routing[t].requires_grad]
        return own

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        predictions, reps = {}, {}
        try:
            for t in tasks:
                set_task(self.adapted, t)
                reps[t] = self.backbone(x)
                predictions[t] = self.heads[t](reps[t])
        finally:
            set_task(self.adapted, None)
        return MultiTaskOutput(predictions, reps)

    def routing_statistics(self) -> dict[str, float]:
        """Per task: the mean over adapted layers and heads of the largest routing weight (1/S is
        uniform, 1 is one skill)."""
        out = {}
        for t in self.task_names:
            top = [float(layer.weights(t).detach().max(-1).values.mean()) for layer in self.adapted]
            out[f"routing/{t}/max_weight"] = sum(top) / len(top)
        return out

    # -- the variants over every adapted layer -------------------------------------------------------
    def add_task(self, task: str, out_features: int = 1) -> None:
        """A new task (few-shot adaptation): routing logits in every layer and a head."""
        for layer in self.adapted:
            layer.add_task(task)
        first = cast(nn.Linear, next(iter(self.heads.values())))
        self.heads[task] = nn.Linear(first.in_features, out_features).to(first.weight.device)
        self.task_names = [*self.task_names, task]

    def serve_only(self, tasks: Sequence[str]) -> None:
        """Serve ``tasks`` alone (few-shot adaptation to a new task): the other tasks' heads and
        routing logits are frozen and the forward runs only these tasks' passes."""
        unknown = [t for t in tasks if t not in self.task_names]
        if unknown or not tasks:
            raise ConfigError(
                f"serve_only needs some of the model's tasks {self.task_names}; got {list(tasks)}."
            )
        for t in self.task_names:
            if t not in tasks:
                self.heads[t].requires_grad_(False)
                for layer in self.adapted:
                    layer.routing[t].requires_grad_(False)
        self.task_names = list(tasks)

    def train_routing_only(self) -> None:
        """MHR-z over every adapted layer."""
        for layer in self.adapted:
            layer.train_routing_only()

    def average_routing(self) -> None:
        """MHR-mu over every adapted layer."""
        for layer in self.adapted:
            layer.average_routing()

    def optimizer_groups(
        self, lr: float = 1e-3, routing_lr: float = 0.1, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """Parameter groups with the official code's split of learning rates: the routing logits at
        ``routing_lr`` (mttl's ``module_logits_learning_rate``, 0.1, without weight decay) and every
        other trainable parameter (skills, heads, a trained backbone) at ``lr``. The logits start
        within 1e-3 of uniform; at the skills' rate they would barely leave it, and Poly and MHR
        would train as MHR-mu. Frozen parameters (MHR-z's skills, MHR-mu's logits) are left out."""
        routing = [p for layer in self.adapted for p in layer.routing.parameters() if p.requires_grad]
        ids = {id(p) for p in routing}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups: list[dict[str, Any]] = [
            {"params": routing, "lr": routing_lr, "weight_decay": 0.0},
            {"params": rest, "lr": lr, "weight_decay": weight_decay},
        ]
        return [g for g in groups if g["params"]]

    def example_input(self, batch: int = 4) -> Tensor:
        return torch.randn(batch, self.in_features)
