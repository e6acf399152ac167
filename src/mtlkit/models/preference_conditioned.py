"""COSMOS's preference-conditioned network: the preference enters as extra inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.models.base import MODELS, MultiTaskModule, MultiTaskOutput, check_input, register
from mtlkit.models.conv import check_image
from mtlkit.models.preference_input import TakesPreference


class PreferencePlanes(nn.Module):
    """COSMOS's image conditioning: the preference, as a ``(K, 1, 1)`` map, through two learned
    transposed convolutions (kernel 4, then kernel 6 with stride 2; no bias; ReLU after each) to a
    10 x 10 map, then nearest-neighbour upsampling to the image size: ``K`` extra input planes."""

    def __init__(self, tasks: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(tasks, tasks, kernel_size=4, stride=1, padding=0, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(tasks, tasks, kernel_size=6, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.Upsample(size=size, mode="nearest"),
        )

    def forward(self, preference: Tensor, batch: int) -> Tensor:
        planes = self.net(preference.reshape(1, -1, 1, 1))
        return planes.expand(batch, -1, -1, -1)


@register("preference_conditioned")
class PreferenceConditioned(TakesPreference, MultiTaskModule):
    """The network of COSMOS: Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning", ICDM 2021. Any registered model (``base``) reads the input together
    with the current preference (:meth:`set_preference`), so one network trained over many
    preferences (with the ``cosmos`` loss, :mod:`mtlkit.pareto`) returns a whole trade-off front:

    - tabular inputs (``in_features`` an int): ``[x, r]``, so the base reads ``in_features + K``
      features, as the official tabular models;
    - images (``in_features`` = ``(C, H, W)``): ``K`` extra channels made from ``r`` by
      :class:`PreferencePlanes`, the official learned upsampler, so the base reads ``C + K``
      channels.

    Args:
        in_features: the input width, or the image shape ``(C, H, W)``.
        tasks: the task set (or task names).
        base: the registry name of the conditioned model (MultiLeNet, ``"lenet"``, in the paper's
            image experiments).
        out_features: outputs per task, or a map, passed to the base.
        base_options: further options of the base.

    The shared part is the base's plus the upsampler; the representation is the base's.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        base: str = "shared_bottom",
        out_features: int | Mapping[str, int] = 1,
        base_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks)
        k = len(self.task_names)
        self._init_preference(k)
        self.planes: PreferencePlanes | None = None
        if isinstance(in_features, int):
            widened: int | tuple[int, ...] = in_features + k
            self.in_features: int | tuple[int, ...] = in_features
        else:
            shape = tuple(int(d) for d in in_features)
            if len(shape) != 3 or min(shape) < 1:
                raise ConfigError(
                    f"preference_conditioned: in_features is a width or (C, H, W), got {in_features}."
                )
            self.in_features = shape
            widened = (shape[0] + k, shape[1], shape[2])
            self.planes = PreferencePlanes(k, (shape[1], shape[2]))
        net = MODELS.create(
            base, in_features=widened, tasks=tasks, out_features=out_features, **dict(base_options or {})
        )
        if not isinstance(net, MultiTaskModule):
            raise ConfigError(f"preference_conditioned: base {base!r} is not an mtlkit MultiTaskModule.")
        self.base: MultiTaskModule = net

    def shared_modules(self) -> Iterable[nn.Module]:
        extra = [self.planes] if self.planes is not None else []
        return [*self.base.shared_modules(), *extra]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return self.base.task_modules(task)

    def conditioned_input(self, x: Tensor) -> Tensor:
        """``x`` with the preference appended (as features or as channels)."""
        r = self.preference.to(x.dtype)
        name = type(self).__name__
        if isinstance(self.in_features, int):
            check_input(x, self.in_features, name)
        else:
            check_image(x, self.in_features[0], self.in_features, name)
        if self.planes is None:
            return torch.cat([x, r.expand(x.shape[0], -1)], dim=1)
        return torch.cat([x, self.planes(r, x.shape[0])], dim=1)

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        return self.base.forward_tasks(self.conditioned_input(x), tasks)
