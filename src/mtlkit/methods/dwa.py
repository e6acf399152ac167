"""DWA: dynamic weight average (Liu, Johns, Davison, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.errors import TaskError
from mtlkit.methods.base import LossWeighting, state_copy, state_to
from mtlkit.methods.registry import register


@register("dwa")
class DWA(LossWeighting):
    """Dynamic weight average from Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019 (MTAN).

    With ``Lbar_k(t)`` the mean training loss of task k in epoch t, epochs 0 and 1 use ``w = 1``;
    from epoch 2 on, ``r_k = Lbar_k(t-1) / Lbar_k(t-2)`` and ``w_k = K softmax(r / T)_k``: tasks
    whose loss fell more slowly get more weight. The loss is ``sum_k w_k L_k`` (a sum, as in the
    official MTAN code). The epoch means are the method's own running means of the losses it was
    given (only over batches where the task had a label); the caller ends each epoch with
    :meth:`on_epoch_end` (the Trainer does).

    Args:
        temperature: ``T`` (official default 2.0).
        window: ``"epoch"`` (the paper, default) or an integer n: the iteration-window variant of
            the nash-mtl benchmark code, where ``r_k`` is the mean loss of the last n steps over
            that of the n steps before and the weights change every step; as there, the weighted
            sum is divided by K (effective weights ``softmax(r / T)``). Unlike nash-mtl, whose
            buffer starts as ones, the weights stay 1/K until 2n real steps were seen: a placeholder
            of 1 against losses of another scale gives meaningless (even overflowing) ratios.

    A task whose mean over the older period is 0 or undefined (no labelled sample) gets ``r = 1``.
    """

    name = "dwa"
    hooks = frozenset({"epoch_end"})

    def __init__(self, temperature: float = 2.0, window: Literal["epoch"] | int = "epoch") -> None:
        super().__init__()
        if not temperature > 0:
            raise TaskError(f"DWA temperature must be > 0, got {temperature!r}.")
        if window != "epoch" and not (
            isinstance(window, int) and not isinstance(window, bool) and window >= 1
        ):
            raise TaskError(f"DWA window must be 'epoch' or an integer >= 1, got {window!r}.")
        self.temperature = float(temperature)
        self.window = window
        self._sum: Tensor | None = None  # this epoch's per-task loss sums and label counts
        self._count: Tensor | None = None
        self._epoch_means: list[Tensor] = []  # the last two epochs' means
        self._buffer: Tensor | None = None  # window mode: the last 2n loss vectors (NaN = no label)
        self._seen = 0
        self._weights: Tensor | None = None

    def _ratio_weights(self, recent: Tensor, older: Tensor) -> Tensor:
        ratio = recent / older
        ratio = torch.where(torch.isfinite(ratio) & (older > 0), ratio, torch.ones_like(ratio))
        return len(ratio) * torch.softmax(ratio / self.temperature, dim=0)

    def to(self, device: torch.device | str) -> DWA:
        self._sum, self._count, self._buffer, self._epoch_means, self._weights = state_to(
            (self._sum, self._count, self._buffer, self._epoch_means, self._weights), device
        )
        return self

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        k = len(losses)
        held = [t for t in (self._sum, self._buffer, *self._epoch_means) if t is not None]
        if any(t.device != losses.device for t in held):  # e.g. after loading a checkpoint
            self.to(losses.device)
        observed = torch.where(active, losses.double(), torch.nan)
        if self.window == "epoch":
            if self._sum is None:
                self._sum = torch.zeros(k, dtype=torch.float64, device=losses.device)
                self._count = torch.zeros(k, dtype=torch.float64, device=losses.device)
            self._sum += torch.nan_to_num(observed)
            self._count += active
            if len(self._epoch_means) < 2:
                weights = torch.ones(k, dtype=torch.float64, device=losses.device)
            else:
                if self._weights is None:
                    self._weights = self._ratio_weights(self._epoch_means[-1], self._epoch_means[-2])
                weights = self._weights.to(losses.device)
        else:
            n = self.window
            if self._buffer is None:
                self._buffer = torch.full((2 * n, k), torch.nan, dtype=torch.float64, device=losses.device)
            self._buffer = torch.roll(self._buffer, -1, dims=0)
            self._buffer[-1] = observed
            self._seen += 1
            if self._seen < 2 * n:
                weights = torch.ones(k, dtype=torch.float64, device=losses.device)
            else:
                weights = self._ratio_weights(self._buffer[n:].nanmean(0), self._buffer[:n].nanmean(0))
            weights = weights / k  # nash-mtl's `.mean()` over the weighted losses
        return torch.where(active, weights, 0.0).to(losses.dtype)

    def on_epoch_end(self) -> None:
        if self.window != "epoch" or self._sum is None:
            return
        if any(m.device != self._sum.device for m in self._epoch_means):
            self.to(self._sum.device)
        means = torch.where(self._count > 0, self._sum / self._count.clamp_min(1), torch.nan)
        self._epoch_means = [*self._epoch_means[-1:], means]
        self._sum = self._count = None
        self._weights = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            state_copy(
                {
                    "epoch_sum": self._sum,
                    "epoch_count": self._count,
                    "epoch_means": self._epoch_means,
                    "buffer": self._buffer,
                    "seen": self._seen,
                }
            )
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        state = state_copy(dict(state))  # the accumulators are updated in place: never the caller's
        self._sum = state.get("epoch_sum")
        self._count = state.get("epoch_count")
        self._epoch_means = list(state.get("epoch_means", []))
        self._buffer = state.get("buffer")
        self._seen = int(state.get("seen", 0))
        self._weights = None

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature!r}, window={self.window!r})"
