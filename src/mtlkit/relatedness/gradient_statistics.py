"""Gradient statistics between tasks over training: pairwise cosines, conflict rate and gradient
magnitude similarity, for the whole shared part or per layer.

``cos(i, j) = g_i . g_j / (||g_i|| ||g_j||)``, a conflict when ``cos < 0``, and the gradient
magnitude similarity ``GMS(i, j) = 2 ||g_i|| ||g_j|| / (||g_i||^2 + ||g_j||^2)`` (Yu, Kumar,
Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020), from
the Gramian of the shared-parameter gradients ``g_i``. Matrices follow the relatedness convention
``A[i, j]`` = effect of source task ``i`` on target task ``j`` (symmetric here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlkit.core.contract import forward_full, shared_parameters, unwrap
from mtlkit.core.engine import GradientEngine
from mtlkit.core.figures import pyplot, save_figure
from mtlkit.core.tasks import Batch
from mtlkit.errors import ConfigError
from mtlkit.train.batches import move_to, unpack_batch
from mtlkit.train.callbacks import Callback

if TYPE_CHECKING:
    from mtlkit.methods import StepInfo
    from mtlkit.train.evaluate import EvaluationReport
    from mtlkit.train.trainer import Trainer


def pairwise_statistics(gramian: Tensor) -> dict[str, Tensor]:
    """``{"cos", "conflict", "gms"}`` (K x K, float64) from a Gramian of task gradients; a zero
    gradient has cosine 0 and GMS 0 with every task."""
    g = gramian.double()
    norms = g.diagonal().clamp_min(0).sqrt()
    outer = norms[:, None] * norms[None, :]
    squares = norms[:, None] ** 2 + norms[None, :] ** 2
    positive = outer > 0
    cos = torch.where(positive, g / outer.clamp_min(1e-300), torch.zeros_like(g))
    gms = torch.where(positive, 2 * outer / squares.clamp_min(1e-300), torch.zeros_like(g))
    return {"cos": cos, "conflict": (cos < 0).double(), "gms": gms}


class GradientStatistics(Callback):
    """Track pairwise gradient statistics every ``every`` steps (a Trainer callback).

    Without ``probe`` the statistics come from the Gramian the method already computed on the
    training batch (Gramian methods: no extra backward pass); a method that computes no per-task
    gradients (a loss weighting) then needs a ``probe`` batch. With ``probe`` the model is run on
    that fixed batch (in eval mode, so dropout and batch statistics stay out) and the engine
    computes the per-task gradients of the shared parameters, the same batch every time, so the
    statistics are comparable over training; ``per_layer`` adds them per shared module.

    Every epoch adds to the Trainer's row (``epochs.csv``): the mean cosine, the conflict rate and
    the mean GMS of each pair over the epoch's measurements, and the exponential moving average
    (``ema``) of the cosine. :meth:`plot` draws the heat maps and the cosines over time.
    """

    def __init__(
        self,
        probe: Any = None,
        every: int = 1,
        per_layer: bool = False,
        ema: float = 0.9,
        engine: GradientEngine | None = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {every!r}.")
        if not 0 <= ema < 1:
            raise ConfigError(f"ema must lie in [0, 1), got {ema!r}.")
        if per_layer and probe is None:
            raise ConfigError("per_layer statistics need a probe batch (the methods' Gramians are whole).")
        self.probe = unpack_batch(probe) if probe is not None else None
        self.every, self.per_layer, self.ema = every, per_layer, ema
        self.engine = engine or GradientEngine(strategy="loop")
        self.names: list[str] = []
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.smoothed: Tensor | None = None
        self.trace: list[tuple[int, list[list[float]]]] = []  # (step, cosine matrix) per measurement
        self.epoch_means: list[dict[str, list[list[float]]]] = []

    # -- measuring -------------------------------------------------------------------------------
    def on_step_end(self, trainer: Trainer, info: StepInfo) -> None:
        if trainer.step % self.every:
            return
        self.names = list(trainer.tasks.names)
        grams = self._gramians(trainer, info)
        for key, gram in grams.items():
            for stat, value in pairwise_statistics(gram).items():
                name = f"{stat}" if key == "" else f"{stat}@{key}"
                self.sums[name] = self.sums.get(name, torch.zeros_like(value)) + value
        self.count += 1
        cos = pairwise_statistics(grams[""])["cos"]
        self.smoothed = cos if self.smoothed is None else self.ema * self.smoothed + (1 - self.ema) * cos
        self.trace.append((trainer.step, cos.tolist()))

    def _gramians(self, trainer: Trainer, info: StepInfo) -> dict[str, Tensor]:
        if self.probe is None:
            if info.gramian is None or not bool(torch.isfinite(info.gramian).all()):
                raise ConfigError(
                    f"{type(trainer.method).__name__} computes no full Gramian of per-task gradients "
                    "this step; give GradientStatistics a probe batch (probe=...) to measure them."
                )
            return {"": info.gramian.detach().cpu().double()}
        model = trainer.model
        batch = move_to(self.probe, trainer.device)
        assert isinstance(batch, Batch)
        was_training = model.training
        model.eval()
        try:
            out = forward_full(model, batch.inputs)
            losses = trainer.tasks.losses(out.predictions, batch.targets, batch.masks)
            shared = shared_parameters(model)
            jac = self.engine.jacobian(list(losses.values()), shared)
            rows = jac.rows().double().cpu()
            grams = {"": rows @ rows.T}
            if self.per_layer:
                offset = 0
                owners = _owner_names(model, shared)
                blocks: dict[str, Tensor] = {}
                for p, owner in zip(shared, owners, strict=True):
                    part = rows[:, offset : offset + p.numel()]
                    gram = part @ part.T
                    blocks[owner] = blocks[owner] + gram if owner in blocks else gram
                    offset += p.numel()
                grams.update(blocks)
            return grams
        finally:
            model.train(was_training)

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, row: dict[str, float], report: EvaluationReport | None
    ) -> None:
        if not self.count:
            return
        means = {k: v / self.count for k, v in self.sums.items()}
        self.epoch_means.append({k: v.tolist() for k, v in means.items()})
        for i, a in enumerate(self.names):
            for j in range(i + 1, len(self.names)):
                b = self.names[j]
                row[f"relatedness/cosine/{a}~{b}"] = float(means["cos"][i, j])
                row[f"relatedness/conflict_rate/{a}~{b}"] = float(means["conflict"][i, j])
                row[f"relatedness/gms/{a}~{b}"] = float(means["gms"][i, j])
                if self.smoothed is not None:
                    row[f"relatedness/cosine_ema/{a}~{b}"] = float(self.smoothed[i, j])
        self.sums, self.count = {}, 0

    def matrices(self) -> dict[str, Tensor]:
        """The last epoch's mean matrices (``cos``, ``conflict``, ``gms``, and per layer
        ``cos@module`` ...), K x K in task order."""
        if not self.epoch_means:
            raise ConfigError("No epoch has ended with gradient statistics yet.")
        return {k: torch.tensor(v) for k, v in self.epoch_means[-1].items()}

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "sums": {k: v.clone() for k, v in self.sums.items()},
            "count": self.count,
            "smoothed": self.smoothed.clone() if self.smoothed is not None else None,
            "trace": [list(t) for t in self.trace],
            "epoch_means": list(self.epoch_means),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.names = list(state["names"])
        self.sums = dict(state["sums"])
        self.count = int(state["count"])
        self.smoothed = state["smoothed"]
        self.trace = [(int(s), m) for s, m in state["trace"]]
        self.epoch_means = list(state["epoch_means"])

    # -- figures ---------------------------------------------------------------------------------
    def plot(self, path: str | Path) -> Path:
        """Heat maps of the last epoch's mean cosine and conflict rate, and every pair's cosine
        over the measured steps; written to ``path`` (PNG)."""
        plt = pyplot()
        means = self.matrices()
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for ax, key, title, cmap in (
            (axes[0], "cos", "mean gradient cosine", "RdBu"),
            (axes[1], "conflict", "conflict rate", "Reds"),
        ):
            low = -1 if key == "cos" else 0
            im = ax.imshow(means[key].numpy(), cmap=cmap, vmin=low, vmax=1)
            ax.set_xticks(range(len(self.names)), self.names, rotation=90)
            ax.set_yticks(range(len(self.names)), self.names)
            ax.set_title(title)
            fig.colorbar(im, ax=ax)
        steps = [s for s, _ in self.trace]
        for i, a in enumerate(self.names):
            for j in range(i + 1, len(self.names)):
                axes[2].plot(steps, [m[i][j] for _, m in self.trace], label=f"{a}~{self.names[j]}", lw=1)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("cosine")
        axes[2].set_title("pairwise cosines over training")
        if len(self.names) <= 6:
            axes[2].legend(fontsize=7)
        return save_figure(fig, path, dpi=110)


def _owner_names(model: Any, params: Sequence[Tensor]) -> list[str]:
    """The name of the module that holds each parameter directly (its layer)."""
    owner: dict[int, str] = {}
    for name, module in unwrap(model).named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), name or "model")
    return [owner.get(id(p), "other") for p in params]
