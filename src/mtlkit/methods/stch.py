"""STCH: smooth Tchebycheff scalarisation (Lin, Zhang, Liu, Zhang, ICML 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError, TaskError
from mtlkit.methods.hparams import hparam, none, number, numbers
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register

_EPS = 1e-20  # inside the logarithms, as in the official code


@register("stch")
class STCH(LossWeighting):
    """Smooth Tchebycheff scalarisation: Lin, Zhang, Liu, Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024, as in the official multi-task
    code (STCH_MTL, built on LibMTL).

    - Epochs ``0 .. warmup_epochs - 1``: minimise ``sum_k log(L_k + eps)``.
    - Epoch ``warmup_epochs``: the same objective, while the mean raw loss of each task over the
      epoch is recorded: the nadir ``n_k``.
    - Afterwards, with ``l_k = log(L_k / n_k + eps)``: minimise
      ``K mu log sum_k exp(l_k / mu)`` (computed as effective weights
      ``w_k = K softmax(l / mu)_k / (L_k + eps n_k)``, the exact gradient).

    ``mu -> 0`` approaches the Tchebycheff (max) scalarisation, ``mu -> inf`` SI's ``sum log L_k``.
    Every labelled task's loss must be > 0 (:class:`~mtlkit.errors.NonPositiveLossError`).
    """

    positive_losses = True
    nadir_point: Tensor
    nadir_sum: Tensor
    nadir_count: Tensor
    mu: float = hparam(1.0, number(gt=0), "smoothing (official default 1.0)")
    warmup_epochs: int = hparam(
        4, number(ge=0, integer=True), "epochs of log-sum training before the nadir epoch"
    )
    nadir: Sequence[float] | None = hparam(
        None, numbers(number(gt=0)) | none(), "a fixed nadir (one value > 0 per task): no warm-up"
    )

    def _build(self, tasks: TaskSet) -> None:
        k = len(tasks)
        if self.nadir is not None and len(self.nadir) != k:
            raise ConfigError(f"STCH got {len(self.nadir)} nadir values for {k} tasks.")
        fixed = self.nadir is not None
        start = (
            torch.tensor(list(self.nadir or ()), dtype=torch.float64)
            if fixed
            else torch.full((k,), torch.nan)
        )
        self.register_buffer("nadir_point", start.double())
        self.register_buffer("nadir_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("nadir_count", torch.zeros(k, dtype=torch.float64))
        self.epoch = 0
        self.has_nadir = fixed  # a plain flag: no host sync per step to test the buffer for NaN

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"nadir"`` (recording the nadir) or ``"stch"``."""
        if self.has_nadir:
            return "stch"
        return "nadir" if self.epoch >= self.warmup_epochs else "warmup"

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        k = len(losses)
        safe = torch.where(active, losses.double(), 1.0)
        if not self.has_nadir:
            if self.epoch >= self.warmup_epochs:  # the nadir epoch
                self.nadir_sum = self.nadir_sum + torch.where(active, safe, 0.0)
                self.nadir_count = self.nadir_count + active
            weights = 1.0 / (safe + _EPS)
        else:
            logs = torch.where(active, torch.log(safe / self.nadir_point + _EPS), -torch.inf)
            share = torch.softmax(logs / self.mu, dim=0)
            weights = k * share / (safe + _EPS * self.nadir_point)
        return weights.to(losses.dtype)

    def _epoch_end(self) -> None:
        if not self.has_nadir and self.epoch >= self.warmup_epochs:
            if bool((self.nadir_count == 0).any()):
                names = self.task_names or []
                missing = [n for n, c in zip(names, self.nadir_count.tolist(), strict=True) if c == 0]
                raise TaskError(
                    f"STCH could not estimate the nadir: task(s) {missing} had no labelled sample in "
                    f"epoch {self.epoch + 1}. Pass nadir= explicitly."
                )
            self.nadir_point = self.nadir_sum / self.nadir_count
            self.has_nadir = True
        self.epoch += 1

    def step_extras(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def _extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "has_nadir": self.has_nadir}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.has_nadir = bool(state.get("has_nadir", False))
