"""DWA: dynamic weight average (Liu, Johns, Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.methods.hparams import hparam, number, one_of
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register


@register("dwa")
class DWA(LossWeighting):
    """Dynamic weight average from Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019 (MTAN).

    With ``Lbar_k(t)`` the mean training loss of task k in epoch t, epochs 0 and 1 use ``w = 1``;
    from epoch 2 on, ``r_k = Lbar_k(t-1) / Lbar_k(t-2)`` and ``w_k = K softmax(r / T)_k``: tasks
    whose loss fell more slowly get more weight. The loss is ``sum_k w_k L_k`` (a sum, as in the
    official MTAN code). The epoch means are the method's own running means of the losses it was
    given (only over batches where the task had a label), closed by :meth:`on_epoch_end`.

    ``window=n`` is the iteration-window variant of the nash-mtl benchmark code: ``r_k`` is the
    mean loss of the last n steps over that of the n steps before, the weights change every step,
    and the weighted sum is divided by K (effective weights ``softmax(r / T)``). Unlike nash-mtl,
    whose buffer starts as ones, the weights stay 1/K until 2n real steps were seen: a placeholder
    of 1 against losses of another scale gives meaningless (even overflowing) ratios. A task whose
    mean over the older period is 0 or undefined (no labelled sample) gets ``r = 1``.
    """

    epoch_sum: Tensor
    epoch_count: Tensor
    epoch_means: Tensor
    recent: Tensor
    temperature: float = hparam(2.0, number(gt=0), "T (official default 2.0)")
    window: Literal["epoch"] | int = hparam(
        "epoch", one_of("epoch") | number(ge=1, integer=True), "'epoch' (the paper) or n steps (nash-mtl)"
    )

    def _build(self, tasks: TaskSet) -> None:
        k = len(tasks)
        f64 = torch.float64
        self.register_buffer("epoch_sum", torch.zeros(k, dtype=f64))
        self.register_buffer("epoch_count", torch.zeros(k, dtype=f64))
        self.register_buffer("epoch_means", torch.full((2, k), torch.nan, dtype=f64))  # [t-2, t-1]
        self.epochs_done = 0  # counters are plain ints in the extra state: no host sync per step
        n = 1 if self.window == "epoch" else int(self.window)
        self.register_buffer("recent", torch.full((2 * n, k), torch.nan, dtype=f64))  # window mode
        self.recent_seen = 0

    def _ratio_weights(self, recent: Tensor, older: Tensor) -> Tensor:
        ratio = recent / older
        ratio = torch.where(torch.isfinite(ratio) & (older > 0), ratio, torch.ones_like(ratio))
        return len(ratio) * torch.softmax(ratio / self.temperature, dim=0)

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        k = len(losses)
        observed = torch.where(active, losses.double(), torch.nan)
        ones = torch.ones(k, dtype=torch.float64, device=losses.device)
        if self.window == "epoch":
            self.epoch_sum = self.epoch_sum + torch.nan_to_num(observed)
            self.epoch_count = self.epoch_count + active
            if self.epochs_done < 2:
                return ones.to(losses.dtype)
            return self._ratio_weights(self.epoch_means[1], self.epoch_means[0]).to(losses.dtype)
        n = int(self.window)
        self.recent = torch.cat([self.recent[1:], observed[None]])
        self.recent_seen += 1
        if self.recent_seen < 2 * n:
            weights = ones
        else:
            weights = self._ratio_weights(self.recent[n:].nanmean(0), self.recent[:n].nanmean(0))
        return (weights / k).to(losses.dtype)  # nash-mtl's `.mean()` over the weighted losses

    def _epoch_end(self) -> None:
        if self.window != "epoch":
            return
        count = self.epoch_count
        means = torch.where(count > 0, self.epoch_sum / count.clamp_min(1), torch.nan)
        self.epoch_means = torch.stack([self.epoch_means[1], means])
        self.epochs_done += 1
        self.epoch_sum = torch.zeros_like(self.epoch_sum)
        self.epoch_count = torch.zeros_like(self.epoch_count)

    def _extra_state(self) -> dict[str, Any]:
        return {"epochs_done": self.epochs_done, "recent_seen": self.recent_seen}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.epochs_done = int(state.get("epochs_done", 0))
        self.recent_seen = int(state.get("recent_seen", 0))
