"""MENTOR's task-oriented perturbation as a Trainer callback: soft resets towards a distribution
fitted to the best parameter snapshots seen so far."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mtlkit.core.contract import unwrap
from mtlkit.errors import ConfigError
from mtlkit.train.callbacks import Callback

if TYPE_CHECKING:
    from mtlkit.train.evaluate import EvaluationReport
    from mtlkit.train.trainer import Trainer


class SnapshotPerturbation(Callback):
    """Task-oriented perturbation (Huang et al., "MENTOR", ICML 2025), for supervised multi-task
    training.

    After every epoch the callback reads ``monitor`` from the epoch's row (a validation value,
    e.g. ``"val/delta_m"`` or ``"val/<task>/loss"``; never the training loss, which rewards
    memorising) and keeps the best ``snapshots`` parameter sets by it (``mode``: ``"max"`` or
    ``"min"``). Every ``every`` epochs it fits a diagonal Gaussian to the kept snapshots (per
    parameter entry: mean and standard deviation), samples ``phi`` from it and soft-resets the
    model: ``theta <- alpha theta + (1 - alpha) phi``. ``alpha`` is a number or a function of the
    model (DrM derives it from the share of dormant neurons; give that as a callable). The
    optimiser's state is left as it is, as in DrM's and MENTOR's resets. Departures: MENTOR ranks
    snapshots by episode return in reinforcement learning; here by a validation value; its
    dormant-ratio schedule is not built in.
    """

    def __init__(
        self,
        monitor: str,
        mode: str = "max",
        snapshots: int = 5,
        every: int = 5,
        alpha: float | Callable[[nn.Module], float] = 0.5,
        seed: int = 0,
    ) -> None:
        if mode not in ("max", "min") or snapshots < 1 or every < 1:
            raise ConfigError(
                "SnapshotPerturbation needs mode 'max' or 'min', snapshots >= 1 and every >= 1."
            )
        if not callable(alpha) and not 0 <= alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1] or a callable, got {alpha!r}.")
        self.monitor, self.mode, self.snapshots, self.every = monitor, mode, snapshots, every
        self.alpha = alpha
        self.generator = torch.Generator().manual_seed(seed)
        self.kept: list[tuple[float, dict[str, Tensor]]] = []
        self.resets = 0

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, row: dict[str, float], report: EvaluationReport | None
    ) -> None:
        if self.monitor not in row:
            raise ConfigError(
                f"SnapshotPerturbation monitors {self.monitor!r}, which the epoch's row lacks (it has "
                f"{sorted(row)[:8]}...); give a validation loader and a monitored key."
            )
        model = unwrap(trainer.model)
        self.offer(float(row[self.monitor]), model)
        if (epoch + 1) % self.every == 0:
            self.perturb(model)
            row["perturbation/resets"] = float(self.resets)

    def offer(self, value: float, model: nn.Module) -> None:
        """Keep the model's current parameters if they are among the best ``snapshots`` (a
        non-finite monitored value is never kept: a diverged snapshot would poison the reset)."""
        if not math.isfinite(value):
            return
        sign = 1.0 if self.mode == "max" else -1.0
        copy = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.kept.append((sign * value, copy))
        self.kept.sort(key=lambda item: item[0], reverse=True)
        del self.kept[self.snapshots :]

    def perturb(self, model: nn.Module) -> None:
        """The soft reset towards a sample of the snapshots' diagonal Gaussian."""
        if not self.kept:
            return
        alpha = float(self.alpha(model)) if callable(self.alpha) else float(self.alpha)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                stack = torch.stack([snap[name] for _, snap in self.kept]).double()
                mean = stack.mean(0)
                std = stack.std(0, unbiased=False)
                phi = mean + std * torch.randn(mean.shape, generator=self.generator, dtype=torch.float64)
                p.mul_(alpha).add_((1 - alpha) * phi.to(p))
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "resets": self.resets, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kept = [(float(v), dict(s)) for v, s in state["kept"]]
        self.resets = int(state["resets"])
        self.generator.set_state(state["generator"])
