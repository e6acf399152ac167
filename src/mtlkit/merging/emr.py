"""EMR-Merging: one elected task vector plus a mask and a scale per task, routed by task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import ConfigError
from mtlkit.merging.base import Merger, register


@dataclass
class TaskModulators:
    """EMR's per-task parts: the unified task vector, each task's mask and scale, and the
    pretrained tensors they modulate (float64, as merged)."""

    pretrained: dict[str, Tensor] = field(default_factory=dict)
    unified: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, list[Tensor]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    def state_dict_for(self, task: str, merged: dict[str, Tensor]) -> dict[str, Tensor]:
        """``theta_0 + scale_t * (mask_t * tau_uni)`` for the modulated tensors, ``merged`` for the
        rest (integer buffers, unmerged statistics)."""
        if task not in self.scales:
            raise ConfigError(f"No modulator for task {task!r}; tasks are {list(self.scales)}.")
        index = list(self.scales).index(task)
        out = dict(merged)
        tied: dict[int, list[str]] = {}
        for key, value in merged.items():
            tied.setdefault(id(value), []).append(key)
        for name, tau in self.unified.items():
            base = self.pretrained[name]
            mask = self.masks[name][index]
            task_tensor = (base + self.scales[task] * torch.where(mask, tau, torch.zeros_like(tau))).to(
                merged[name].dtype
            )
            for alias in tied[id(merged[name])]:  # tied tensors stay tied
                out[alias] = task_tensor
        return out


@register("emr")
class EMR(Merger):
    """EMR-Merging (Huang, Ye, Li, Cai, Chen, Ge, "EMR-Merging: Tuning-Free High-Performance Model
    Merging", NeurIPS 2024).

    Elect: ``gamma = sign(sum_t tau_t)`` (0 mapped to -1, as FusionBench) and the unified vector
    ``tau_uni = gamma * max{|tau_t| : sign(tau_t) = gamma}`` (0 where no task agrees). Mask:
    ``M_t = [tau_t * gamma > 0]``. Rescale: ``r_t = sum_l mean|tau_t^l| / sum_l mean|M_t^l *
    tau_uni^l|`` over the merged tensors. Task t's model is ``theta_0 + r_t (M_t * tau_uni)``:
    ``MergeResult.for_task(t)``; it needs the task at inference (task routing). No
    hyper-parameters and no data. ``MergeResult.state_dict`` holds ``theta_0 + tau_uni`` (the
    elected model, not meant to be used without a task's modulator).

    Memory: the unified vector in float64 and one boolean mask per task and tensor (T bytes per
    parameter) are kept in ``MergeResult.extras["modulators"]``.
    """

    def __init__(self) -> None:
        self._mods = TaskModulators()
        self._own: list[float] = []
        self._masked: list[float] = []

    def params(self) -> dict[str, Any]:
        return {}

    def begin(self) -> None:
        self._mods, self._own, self._masked = TaskModulators(), [], []

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        taus = torch.stack([e - pretrained for e in experts])
        gamma = torch.sign(taus.sum(0))
        gamma = torch.where(gamma == 0, -torch.ones_like(gamma), gamma)
        agree = taus * gamma > 0
        magnitude = torch.where(agree, taus.abs(), torch.zeros_like(taus)).amax(0)
        unified = gamma * magnitude
        if not self._own:
            self._own = [0.0] * len(experts)
            self._masked = [0.0] * len(experts)
        for t in range(len(experts)):
            self._own[t] += float(taus[t].abs().mean()) if taus[t].numel() else 0.0
            masked = torch.where(agree[t], unified, torch.zeros_like(unified))
            self._masked[t] += float(masked.abs().mean()) if masked.numel() else 0.0
        self._mods.pretrained[name] = pretrained.clone()
        self._mods.unified[name] = unified
        self._mods.masks[name] = list(agree.unbind(0))
        return pretrained + unified

    def finish(self, experts: Sequence[str]) -> dict[str, Any]:
        scales = {
            name: (own / masked if masked > 0 else 1.0)
            for name, own, masked in zip(experts, self._own, self._masked, strict=True)
        }
        self._mods.scales = scales
        mods, self._mods = self._mods, TaskModulators()
        self._own, self._masked = [], []
        return {"modulators": mods}
