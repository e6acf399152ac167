"""Cross-stitch networks: one convolutional column per task, mixed after every stage but the last."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, register, resolve_out_features
from mtlkit.models.conv import check_channels, check_image, encoder_stage, image_channels, pooled_head


def cross_stitch_init(num_tasks: int, alpha_self: float, channels: int | None) -> Tensor:
    """``alpha = a I + (1 - a)/(T - 1) (1 - I)``: rows sum to one, so the mixed features keep the
    scale of the columns' (T = 1: the identity); repeated over channels when given."""
    if num_tasks == 1:
        alpha = torch.ones(1, 1)
    else:
        other = (1.0 - alpha_self) / (num_tasks - 1)
        alpha = torch.full((num_tasks, num_tasks), other)
        alpha.fill_diagonal_(alpha_self)
    return alpha if channels is None else alpha[:, :, None].repeat(1, 1, channels)


@register("cross_stitch")
class CrossStitch(MultiTaskModule):
    """Cross-stitch networks (Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for
    Multi-task Learning", CVPR 2016).

    One copy of a small convolutional encoder per task (a column); after each stage but the last,
    a cross-stitch unit replaces each column's features by a learned linear combination of all
    columns' features, ``h~_t = sum_s alpha[t, s] h_s`` (``alpha[t, s, c]`` per channel with
    ``per_channel``). Each column's last stage and a pooled head give the task's output.

    Args:
        in_features: input channels C, or the image shape (C, H, W).
        tasks: the task set (or task names).
        channels: output channels of the stages (two conv blocks and a 2x2 max-pool each); at
            least two stages, since the last one is each task's own.
        tower_dims, out_features, activation: the heads (global average pooling, then an MLP).
        alpha_self: initial weight of a column on itself; the rest is shared equally by the other
            columns. The paper found (0.9, 0.1) best for two tasks; LibMTL initialises every
            alpha to 1, which sums the columns (feature scale grows with T).
        per_channel: one alpha per channel instead of one per column pair.

    The paper trains the alphas with a larger learning rate than the columns;
    :meth:`cross_stitch_parameters` returns them for an optimiser parameter group.

    What is shared: every column below the last unit reaches every task's loss through the
    mixing, and so do the alphas below the last unit; the last unit's row t reaches task t only,
    but the unit is one tensor and is counted as shared. Each column's last stage and head are
    its task's own. The
    representation is per task: the mixed features a column's last stage reads. With alpha = I
    the columns are independent and a task's loss has exactly zero gradient on other columns.

    Departure from the paper: the columns are this small encoder rather than AlexNet, and units
    sit after stages rather than after pool1/pool2/pool5/fc6/fc7.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        channels: Sequence[int] = (16, 32, 64),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        alpha_self: float = 0.9,
        per_channel: bool = False,
    ) -> None:
        super().__init__(tasks)
        name = type(self).__name__
        self.in_channels, self.image_shape = image_channels(in_features, name)
        self.in_features = in_features
        widths = check_channels(channels, name, least=2)
        if not 0.0 <= alpha_self <= 1.0:
            raise ConfigError(f"{name}: alpha_self must be in [0, 1], got {alpha_self}.")
        k = len(self.task_names)
        ins = [self.in_channels, *widths[:-1]]
        self.columns = nn.ModuleDict(
            {
                t: nn.ModuleList([encoder_stage(i, o) for i, o in zip(ins, widths, strict=True)])
                for t in self.task_names
            }
        )
        self.alphas = nn.ParameterList(
            [nn.Parameter(cross_stitch_init(k, alpha_self, w if per_channel else None)) for w in widths[:-1]]
        )
        outs = resolve_out_features(self.task_names, out_features)
        self.heads = nn.ModuleDict(
            {t: pooled_head(widths[-1], tower_dims, outs[t], activation) for t in self.task_names}
        )

    def column(self, task: str) -> nn.ModuleList:
        """Task ``task``'s stages."""
        return cast(nn.ModuleList, self.columns[task])

    def shared_modules(self) -> Iterable[nn.Module]:
        return [*(nn.ModuleList(list(self.column(t))[:-1]) for t in self.task_names), self.alphas]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.column(task)[-1], self.heads[task]]

    def cross_stitch_parameters(self) -> list[nn.Parameter]:
        """The mixing weights (for a parameter group with a larger learning rate)."""
        return list(self.alphas)

    def example_input(self, batch: int = 4) -> Tensor:
        return torch.randn(batch, *(self.image_shape or (self.in_channels, 16, 16)))

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        check_image(x, self.in_channels, self.image_shape, type(self).__name__)
        names = self.task_names
        h = torch.stack([self.column(t)[0](x) for t in names])  # (T, B, C, H, W)
        for stage, alpha in enumerate(self.alphas):
            # per pair: (T, T), one weight per column; per channel: (T, T, C)
            h = torch.einsum("tsc,sbchw->tbchw" if alpha.dim() == 3 else "ts,sbchw->tbchw", alpha, h)
            if stage + 1 < len(self.alphas):
                h = torch.stack([self.column(t)[stage + 1](h[i]) for i, t in enumerate(names)])
        mixed = {t: h[names.index(t)] for t in tasks}
        out = {t: self.heads[t](self.column(t)[-1](mixed[t])) for t in tasks}
        return MultiTaskOutput(out, mixed)
