"""MultiLeNet: the shared-bottom LeNet of the MultiMNIST / Multi-Fashion benchmarks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, mlp, register, resolve_out_features
from mtlkit.models.conv import check_image, image_channels


@register("lenet")
class MultiLeNet(MultiTaskModule):
    """A LeNet-5-style shared encoder with an MLP head per task, as in Sener & Koltun (NeurIPS 2018)
    and the Pareto MTL code (Lin et al., NeurIPS 2019): ``Conv(C, 10, 9) -> MaxPool 2 -> ReLU ->
    Conv(10, 20, 5) -> MaxPool 2 -> ReLU -> Linear(., 50) -> ReLU`` shared, and per task
    ``Linear(50, 50) -> ReLU -> Linear(50, out)``.

    Args:
        in_features: the image shape (C, H, W), or C for C x 28 x 28 images; the flattened width
            after the convolutions follows from it (180 for 28x28 inputs, 500 for the 36x36 inputs
            of the Pareto MTL files).
        tasks: the task set (or task names).
        out_features: outputs per task (10 for a 10-way ``ce`` task), or a map.
        hidden: width of the shared fully connected layer (50 in the papers).
        tower_dims: hidden widths of each head (one layer of 50 in the papers).
        dropout: dropout before the shared fully connected layer (0 in the papers).

    The representation is the shared layer's output (B, ``hidden``).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 10,
        hidden: int = 50,
        tower_dims: Sequence[int] = (50,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        channels, shape = image_channels(in_features, "lenet")
        shape = shape or (channels, 28, 28)
        if min(shape[1:]) < 20:
            raise ConfigError(f"lenet needs images of at least 20x20 pixels, got {shape[1]}x{shape[2]}.")
        self.in_channels, self.image_shape = channels, shape
        self.in_features = shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 10, 9),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, 20, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, *shape)).shape[1]
        self.shared = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.ReLU())
        outs = resolve_out_features(self.task_names, out_features)
        self.heads = nn.ModuleDict(
            {t: mlp(hidden, tower_dims, "relu", out_features=outs[t]) for t in self.task_names}
        )

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.features, self.shared]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.heads[task]]

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        check_image(x, self.in_channels, self.image_shape, type(self).__name__)
        z = self.shared(self.features(x))
        return MultiTaskOutput({t: self.heads[t](z) for t in tasks}, z)
