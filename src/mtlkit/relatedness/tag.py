"""TAG: task affinity by lookahead, and the grouping it suggests (Fifty, Amid, Zhao, Yu, Anil, Finn,
"Efficiently Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021).

``Z_{i->j} = 1 - L_j(theta_s^{+i}) / L_j(theta_s)``: how much one optimiser step on task ``i``'s
loss alone, applied to the shared parameters, lowers task ``j``'s loss on the same batch; divided by
the learning rate, as the official code does. The step is the optimiser's own (momentum, Adam's
moments, weight decay): mtlkit runs the real ``optimizer.step()`` with task ``i``'s gradient on the
shared parameters and then restores the weights, the optimiser state and the normalisation
statistics exactly (the official code's momentum lookup reads a dictionary that never holds the
buffers, so it silently takes a plain SGD step).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from math import comb
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mtlkit.core.contract import forward_full, shared_parameters
from mtlkit.core.engine import GradientEngine
from mtlkit.core.module_state import normalization_buffers, restore_buffers
from mtlkit.core.tasks import Batch, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.relatedness.rows import directed_entries
from mtlkit.train.callbacks import Callback

if TYPE_CHECKING:
    from mtlkit.train.evaluate import EvaluationReport
    from mtlkit.train.trainer import Trainer


def lookahead_affinity(
    model: nn.Module,
    tasks: TaskSet,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    combined: bool = True,
    engine: GradientEngine | None = None,
) -> Tensor:
    """The (K, K) matrix ``Z[i, j] / lr`` on ``batch`` (a further row for the summed loss's step
    when ``combined``); a task without a labelled sample gives a NaN row and column. The model's
    weights and buffers and the optimiser's state are left exactly as they were."""
    if not isinstance(batch, Batch):
        raise ConfigError("TAG's lookahead takes an ordinary Batch (every task's labels on the same inputs).")
    engine = engine or GradientEngine(strategy="loop")
    shared = shared_parameters(model)
    params = [p for p in model.parameters()]
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    buffers = normalization_buffers(model)
    try:
        out = forward_full(model, batch.inputs)
        losses = tasks.losses(out.predictions, batch.targets, batch.masks)
        before = torch.stack([v.detach() for v in losses.values()]).double()
        labelled = losses.labelled if losses.labelled is not None else torch.ones(len(before))
        jac = engine.jacobian(list(losses.values()), shared)
        rows = jac.rows().clone()
        restore_buffers(buffers)
        sources = [rows[i] for i in range(len(rows))] + ([rows.sum(0)] if combined else [])
        out_rows = []
        for g in sources:
            for p in params:
                p.grad = None
            jac.write_shared_flat(g)  # source i's gradient on the shared parameters only
            optimizer.step()
            with torch.no_grad():
                after_out = forward_full(model, batch.inputs)
                after = torch.stack(
                    [
                        v.detach()
                        for v in tasks.losses(after_out.predictions, batch.targets, batch.masks).values()
                    ]
                ).double()
            out_rows.append(1.0 - after / before)
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            restore_buffers(buffers)
            optimizer.load_state_dict(copy.deepcopy(state))
    finally:
        with torch.no_grad():
            for p, s, old in zip(params, saved, grads, strict=True):
                p.copy_(s)
                p.grad = old
        restore_buffers(buffers)
        optimizer.load_state_dict(state)
    z = torch.stack(out_rows) / float(optimizer.param_groups[0]["lr"])
    missing = labelled.to(z.device) == 0
    z[:, missing] = float("nan")
    z[: len(before)][missing] = float("nan")
    return z.cpu()


class TaskAffinity(Callback):
    """TAG's lookahead affinity during training, every ``every`` steps on the step's own batch,
    before the step (the official default is every 10th batch), averaged over all of training.

    Each epoch adds ``relatedness/tag/<source>-><target>`` (the running mean) to the Trainer's
    row; :meth:`matrix` gives the K x K mean (row = source, column = target) and, with
    ``combined``, :meth:`combined` the row of the summed loss's step.
    """

    def __init__(self, every: int = 10, combined: bool = True) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {every!r}.")
        self.every, self.use_combined = every, combined
        self.names: list[str] = []
        self.total: Tensor | None = None
        self.counts: Tensor | None = None

    def on_train_batch_start(self, trainer: Trainer, batch: Any) -> None:
        if trainer.step % self.every:
            return
        self.names = list(trainer.tasks.names)
        z = lookahead_affinity(trainer.model, trainer.tasks, batch, trainer.optimizer, self.use_combined)
        finite = torch.isfinite(z)
        if self.total is None or self.counts is None:
            self.total, self.counts = torch.zeros_like(z), torch.zeros_like(z)
        self.total += torch.where(finite, z, torch.zeros_like(z))
        self.counts += finite.to(z.dtype)

    def _mean(self) -> Tensor:
        if self.total is None or self.counts is None:
            raise ConfigError("TaskAffinity has not measured a step yet.")
        return self.total / self.counts.clamp_min(1)

    def matrix(self) -> Tensor:
        """Mean ``Z / lr`` (K x K, row = source, column = target) over the measured steps."""
        return self._mean()[: len(self.names)]

    def combined(self) -> Tensor:
        """Mean ``Z / lr`` of the summed loss's step on each task (K,)."""
        if not self.use_combined:
            raise ConfigError("TaskAffinity(combined=False) does not measure the summed loss's step.")
        return self._mean()[len(self.names)]

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, row: dict[str, float], report: EvaluationReport | None
    ) -> None:
        if self.total is None:
            return
        row.update(directed_entries("relatedness/tag", self.names, self.matrix()))

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "total": self.total, "counts": self.counts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self.names = list(state["names"])
            self.total, self.counts = state["total"], state["counts"]


#: a singleton group's score in the official notebook: training a task alone is never chosen
OFFICIAL_SINGLETON_SCORE = -1e6


def group_scores(
    affinity: np.ndarray, group: Sequence[int], singleton_score: float = OFFICIAL_SINGLETON_SCORE
) -> dict[int, float]:
    """TAG's score of each member ``j`` of ``group``: the mean affinity onto ``j`` from its
    group-mates; a singleton scores ``singleton_score`` (-1e6, strongly discouraged, as in the
    official notebook; 0 lets a task train alone when every group would bring it negative
    affinity, an mtlkit option)."""
    if len(group) == 1:
        return {group[0]: singleton_score}
    return {j: float(np.mean([affinity[i, j] for i in group if i != j])) for j in group}


def select_groups(
    affinity: np.ndarray | Tensor,
    budget: int,
    max_combinations: int = 2_000_000,
    singleton_score: float = OFFICIAL_SINGLETON_SCORE,
) -> tuple[list[tuple[int, ...]], float]:
    """At most ``budget`` (possibly overlapping) task groups covering every task that maximise the
    mean over tasks of the best score a task gets in a chosen group containing it. Exhaustive
    over all subsets when that is at most ``max_combinations`` choices, else greedy (add the group
    that raises the objective most, ``budget`` times). ``singleton_score``: see :func:`group_scores`.
    Returns the groups and the objective."""
    a = np.asarray(affinity, dtype=np.float64)
    k = a.shape[0]
    if a.shape != (k, k) or not np.isfinite(a).all():
        raise ConfigError("The affinity matrix must be square and finite.")
    if not (isinstance(budget, int) and budget >= 1):
        raise ConfigError(f"budget must be an integer >= 1, got {budget!r}.")
    subsets = [g for r in range(1, k + 1) for g in itertools.combinations(range(k), r)]
    scores = np.full((len(subsets), k), -np.inf)
    for s, g in enumerate(subsets):
        for j, v in group_scores(a, g, singleton_score).items():
            scores[s, j] = v

    def objective(choice: Sequence[int]) -> float:
        best = scores[list(choice)].max(axis=0)
        return float(best.mean()) if np.isfinite(best).all() else -np.inf

    budget = min(budget, len(subsets))
    total = sum(comb(len(subsets), r) for r in range(1, budget + 1))
    if total <= max_combinations:
        best_choice, best_value = None, -np.inf
        for r in range(1, budget + 1):
            for choice in itertools.combinations(range(len(subsets)), r):
                value = objective(choice)
                if value > best_value:
                    best_choice, best_value = choice, value
        assert best_choice is not None
        return [subsets[s] for s in best_choice], best_value
    chosen: list[int] = [len(subsets) - 1]  # start from all tasks together (every task covered)
    for _ in range(budget - 1):
        gains = [(objective([*chosen, s]), s) for s in range(len(subsets)) if s not in chosen]
        value, pick = max(gains)
        if value <= objective(chosen):
            break
        chosen.append(pick)
    return [subsets[s] for s in chosen], objective(chosen)
