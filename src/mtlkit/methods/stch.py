"""STCH: smooth Tchebycheff scalarisation (Lin, Zhang, Liu, Zhang, ICML 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import TaskError
from mtlkit.methods.base import LossWeighting, state_copy, state_to
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
    The caller ends each epoch with :meth:`on_epoch_end` (the Trainer does). Every labelled task's
    loss must be > 0 (:class:`~mtlkit.errors.NonPositiveLossError`).

    Args:
        mu: smoothing (official default 1.0).
        warmup_epochs: epochs of log-sum training before the nadir epoch (official default 4).
        nadir: a fixed reference vector (one positive value per task): skip the warm-up and use
            the smooth Tchebycheff objective from the first step.
    """

    name = "stch"
    hooks = frozenset({"epoch_end"})
    positive_losses = True

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4, nadir: Sequence[float] | None = None) -> None:
        super().__init__()
        if not mu > 0:
            raise TaskError(f"STCH mu must be > 0, got {mu!r}.")
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise TaskError(f"STCH warmup_epochs must be an integer >= 0, got {warmup_epochs!r}.")
        self.mu = float(mu)
        self.warmup_epochs = warmup_epochs
        self.fixed_nadir = None if nadir is None else [float(v) for v in nadir]
        if self.fixed_nadir is not None and not all(v > 0 for v in self.fixed_nadir):
            raise TaskError(f"STCH nadir values must be > 0, got {nadir!r}.")
        self.epoch = 0
        self.nadir: Tensor | None = None
        self._sum: Tensor | None = None
        self._count: Tensor | None = None

    def _build(self, num_tasks: int) -> None:
        if self.fixed_nadir is not None:
            if len(self.fixed_nadir) != num_tasks:
                raise TaskError(f"STCH got {len(self.fixed_nadir)} nadir values for {num_tasks} tasks.")
            self.nadir = torch.tensor(self.fixed_nadir, dtype=torch.float64)

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"nadir"`` (recording the nadir) or ``"stch"``."""
        if self.nadir is not None:
            return "stch"
        return "nadir" if self.epoch >= self.warmup_epochs else "warmup"

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        k = len(losses)
        if self._sum is not None and self._sum.device != losses.device:  # e.g. after loading a checkpoint
            self.to(losses.device)
        safe = torch.where(active, losses.double(), 1.0)
        if self.nadir is None:
            if self.epoch >= self.warmup_epochs:  # the nadir epoch
                if self._sum is None:
                    self._sum = torch.zeros(k, dtype=torch.float64, device=losses.device)
                    self._count = torch.zeros(k, dtype=torch.float64, device=losses.device)
                self._sum += torch.where(active, safe, 0.0)
                self._count += active
            weights = 1.0 / (safe + _EPS)
        else:
            nadir = self.nadir.to(losses.device)
            logs = torch.where(active, torch.log(safe / nadir + _EPS), -torch.inf)
            share = torch.softmax(logs / self.mu, dim=0)
            weights = k * share / (safe + _EPS * nadir)
        return torch.where(active, weights, 0.0).to(losses.dtype)

    def on_epoch_end(self) -> None:
        if self.nadir is None and self.epoch >= self.warmup_epochs and self._sum is not None:
            if bool((self._count == 0).any()):
                missing = [
                    n for n, c in zip(self.task_names or [], self._count.tolist(), strict=True) if c == 0
                ]
                raise TaskError(
                    f"STCH could not estimate the nadir: task(s) {missing} had no labelled sample in "
                    f"epoch {self.epoch + 1}. Pass nadir= explicitly."
                )
            self.nadir = self._sum / self._count
            self._sum = self._count = None
        self.epoch += 1

    def step_extras(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            state_copy(
                {"epoch": self.epoch, "nadir": self.nadir, "nadir_sum": self._sum, "nadir_count": self._count}
            )
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        state = state_copy(dict(state))  # the accumulators are updated in place: never the caller's
        self.epoch = int(state.get("epoch", 0))
        self.nadir = state.get("nadir")
        self._sum = state.get("nadir_sum")
        self._count = state.get("nadir_count")

    def to(self, device: torch.device | str) -> STCH:
        self.nadir, self._sum, self._count = state_to((self.nadir, self._sum, self._count), device)
        return self

    def __repr__(self) -> str:
        return f"STCH(mu={self.mu!r}, warmup_epochs={self.warmup_epochs!r})"
