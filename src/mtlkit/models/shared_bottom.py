"""Shared-bottom (hard parameter sharing) multi-task network."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.models.base import (
    MultiTaskModule,
    MultiTaskOutput,
    check_input,
    mlp,
    register,
    resolve_out_features,
)


@register("shared_bottom")
class SharedBottom(MultiTaskModule):
    """Hard parameter sharing (Caruana, "Multitask Learning", Machine Learning 1997): a shared
    bottom MLP ``f`` and one tower per task, ``y_t = h_t(f(x))``.

    Args:
        in_features: input width.
        tasks: the task set (or task names); one tower per task.
        bottom_dims: hidden widths of the shared bottom.
        tower_dims: hidden widths of each tower (a final ``Linear`` to ``out_features`` follows).
        out_features: outputs per task (1 for regression / binary logits, C for ``ce``), or a map.
        activation, dropout, batch_norm: layer options of every MLP.

    The representation (``model(x, full_output=True).representation``) is the bottom's output
    (B, bottom_dims[-1]).
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        bottom_dims: Sequence[int] = (256, 128),
        tower_dims: Sequence[int] = (64,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(tasks)
        self.in_features = in_features
        outs = resolve_out_features(self.task_names, out_features)
        self.bottom = mlp(in_features, bottom_dims, activation, dropout, batch_norm)
        width = bottom_dims[-1] if bottom_dims else in_features
        self.towers = nn.ModuleDict(
            {
                t: mlp(width, tower_dims, activation, dropout, batch_norm, out_features=outs[t])
                for t in self.task_names
            }
        )

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.bottom]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.towers[task]]

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        check_input(x, self.in_features, type(self).__name__)
        z = self.bottom(x)
        return MultiTaskOutput({t: self.towers[t](z) for t in tasks}, z)
