"""MTAN: a shared convolutional encoder with task-specific soft-attention masks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, register, resolve_out_features
from mtlkit.models.conv import check_channels, check_image, conv_block, image_channels, pooled_head


def attention_module(in_channels: int, channels: int) -> nn.Sequential:
    """``conv1x1 -> BN -> ReLU -> conv1x1 -> BN -> sigmoid``: an element-wise mask in (0, 1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 1),
        nn.BatchNorm2d(channels),
        nn.Sigmoid(),
    )


class SharedStage(nn.Module):
    """A stage of the shared encoder: ``p = block_a(x)``, ``q = block_b(p)`` (the model pools
    ``q`` for the next stage). The attention modules read ``p`` and mask ``q``."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.first = conv_block(in_channels, channels)
        self.second = conv_block(channels, channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.first(x)
        return p, self.second(p)


@register("mtan")
class MTAN(MultiTaskModule):
    """MTAN (Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).

    A shared encoder of J stages; stage j gives an intermediate map ``p_j`` (after its first conv
    block) and its output ``q_j``. Task t has one attention module per stage,
    ``a_tj = att_tj([p_j ; f_t,j-1])`` (stage 1: ``att_t1(p_1)``), and its features are
    ``f_tj = pool(block_j(a_tj * q_j))``, where ``block_j`` is a conv block shared by all tasks,
    as in the official code (``encoder_block_att``). Heads read ``f_tJ``.

    Args:
        in_features: input channels C, or the image shape (C, H, W).
        tasks: the task set (or task names).
        channels: channels of the encoder stages.
        tower_dims, out_features, activation: the heads (global average pooling, then an MLP).

    What is shared: the encoder and the attention-side conv blocks (all tasks run their features
    through them); each task owns its attention modules and head. The representation is per task,
    ``f_tJ``; the attention modules lie below it and get their own gradient.

    Departure from the official code: the official model is a SegNet encoder-decoder for dense
    prediction (NYUv2, CityScapes) with attention in the decoder too; this is the encoder half on
    a small convolutional backbone (three stages of two conv blocks by default) with pooled heads,
    for image-level tasks (MultiMNIST, Multi-Fashion). The attention modules, their inputs and
    the shared attention-side blocks are as in the official encoder, except that the last stage's
    task features are max-pooled too (the official encoder does not pool after its last stage).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        channels: Sequence[int] = (16, 32, 64),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__(tasks)
        name = type(self).__name__
        self.in_channels, self.image_shape = image_channels(in_features, name)
        self.in_features = in_features
        widths = check_channels(channels, name)
        ins = [self.in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList([SharedStage(i, o) for i, o in zip(ins, widths, strict=True)])
        # the shared block after stage j maps to stage j+1's width (the last keeps its width)
        nxt = [*widths[1:], widths[-1]]
        self.attention_blocks = nn.ModuleList([conv_block(w, n) for w, n in zip(widths, nxt, strict=True)])
        self.pool = nn.MaxPool2d(2)
        self.attention = nn.ModuleDict(
            {
                t: nn.ModuleList([attention_module(w if j == 0 else 2 * w, w) for j, w in enumerate(widths)])
                for t in self.task_names
            }
        )
        outs = resolve_out_features(self.task_names, out_features)
        self.heads = nn.ModuleDict(
            {t: pooled_head(nxt[-1], tower_dims, outs[t], activation) for t in self.task_names}
        )
        #: per task, the mean attention mask of every stage in the last forward
        self.last_masks: dict[str, list[Tensor]] = {}

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.encoder, self.attention_blocks]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.attention[task], self.heads[task]]

    def example_input(self, batch: int = 4) -> Tensor:
        size = 2 ** (len(self.encoder) + 1)
        return torch.randn(batch, *(self.image_shape or (self.in_channels, size, size)))

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        check_image(x, self.in_channels, self.image_shape, type(self).__name__)
        stages = []
        h = x
        for stage in self.encoder:
            p, q = stage(h)
            stages.append((p, q))
            h = self.pool(q)
        features = {}
        self.last_masks.clear()
        for t in tasks:
            f: Tensor | None = None
            masks = []
            attention = cast(nn.ModuleList, self.attention[t])
            for j, (p, q) in enumerate(stages):
                mask = attention[j](p if f is None else torch.cat([p, f], dim=1))
                masks.append(mask.detach().mean())
                f = self.pool(self.attention_blocks[j](mask * q))
            assert f is not None
            features[t] = f
            self.last_masks[t] = masks
        return MultiTaskOutput({t: self.heads[t](features[t]) for t in tasks}, features)

    def routing_statistics(self) -> dict[str, float]:
        """``mask/<task>/stage<j>``: the mean attention mask value per task and stage (1: the task
        takes the shared features whole)."""
        return {
            f"mask/{t}/stage{j + 1}": float(m.double().mean())
            for t, masks in self.last_masks.items()
            for j, m in enumerate(masks)
        }
