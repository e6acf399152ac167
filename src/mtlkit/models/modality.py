"""A multi-modality multi-task model whose branches meet at FULLER's gradient calibration."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.core.gradient_calibration import ModalityGradientCalibration
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, ShapeMismatchError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, mlp, register, resolve_out_features


@register("modality_fusion")
class ModalityFusion(MultiTaskModule):
    """A multi-modality multi-task network: one encoder per modality, fusion by concatenation, a
    shared trunk and one tower per task (the structure of FULLER's LiDAR + camera BEV model,
    Huang et al., ICCV 2023, at MLP scale).

    The input is one tensor whose last dimension concatenates the modalities (``modality_dims``
    wide each), so every tabular dataset with feature groups fits (QM9: 1,024 Morgan counts and 24
    descriptors). The encoders' outputs pass a :class:`ModalityGradientCalibration` before the
    fusion (inactive unless the ``fuller`` method switches it on). The representation is the
    trunk's output, the last shared layer, where FULLER calibrates the task gradients.

    Args:
        in_features: input width (the modalities' widths added up).
        tasks: the task set (or names).
        modality_dims: the width of each modality's slice of the input, in order (default: two
            halves).
        encoder_dims: hidden widths of every modality encoder (its output is the last width).
        trunk_dims: hidden widths of the shared trunk after the fusion.
        tower_dims, out_features, activation, dropout: as for :class:`SharedBottom`.
        modality_names: names for the logs (default ``m0``, ``m1``, ...).
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        modality_dims: Sequence[int] | None = None,
        encoder_dims: Sequence[int] = (64,),
        trunk_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        modality_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(tasks)
        if modality_dims is None:  # two halves
            modality_dims = [in_features - in_features // 2, in_features // 2]
        dims = [int(d) for d in modality_dims]
        if len(dims) < 2 or any(d < 1 for d in dims):
            raise ConfigError(f"modality_dims needs at least two widths >= 1, got {list(modality_dims)}.")
        if sum(dims) != in_features:
            raise ConfigError(f"modality_dims {dims} add up to {sum(dims)}, not in_features={in_features}.")
        if not encoder_dims:
            raise ConfigError("encoder_dims needs at least one width (each modality's encoding).")
        self.modality_dims = dims
        self.in_features = sum(dims)
        self.modality_names = list(modality_names) if modality_names else [f"m{i}" for i in range(len(dims))]
        if len(self.modality_names) != len(dims):
            raise ConfigError(f"{len(self.modality_names)} modality names for {len(dims)} modalities.")
        self.encoders = nn.ModuleList([mlp(d, encoder_dims, activation, dropout) for d in dims])
        self.calibration = ModalityGradientCalibration()
        fused = encoder_dims[-1] * len(dims)
        self.trunk = mlp(fused, trunk_dims, activation, dropout)
        width = trunk_dims[-1] if trunk_dims else fused
        outs = resolve_out_features(self.task_names, out_features)
        self.towers = nn.ModuleDict(
            {t: mlp(width, tower_dims, activation, dropout, out_features=outs[t]) for t in self.task_names}
        )

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.encoders, self.trunk]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.towers[task]]

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{modality: its encoder's parameters}``."""
        return {n: list(e.parameters()) for n, e in zip(self.modality_names, self.encoders, strict=True)}

    def encode(self, x: Tensor) -> list[Tensor]:
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ShapeMismatchError(
                f"ModalityFusion expects inputs (..., {self.in_features}) (modalities {self.modality_dims}); "
                f"got {tuple(x.shape)}."
            )
        parts = torch.split(x, self.modality_dims, dim=-1)
        return [enc(p) for enc, p in zip(self.encoders, parts, strict=True)]

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        features = self.calibration(*self.encode(x))
        z = self.trunk(torch.cat(features, dim=-1))
        return MultiTaskOutput({t: self.towers[t](z) for t in tasks}, z)
