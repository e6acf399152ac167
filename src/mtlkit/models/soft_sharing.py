"""Soft parameter sharing: one network per task, tied by a penalty on their differences."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, unknown_name
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, mlp, register, resolve_out_features
from mtlkit.models.gating import ExpertInputs

PENALTIES = ("l2", "mean", "trace")
COUPLED = ("hidden", "all")


def coupling_penalty(layers: Sequence[Sequence[Tensor]], penalty: str) -> Tensor:
    """The penalty over aligned parameter groups: ``layers[g]`` holds group g's tensor of every
    task (same shape).

    - ``"l2"``: ``sum_g sum_{s<t} ||W_s - W_t||^2`` (pairwise, Duong et al. 2015);
    - ``"mean"``: ``sum_g sum_t ||W_t - mean_s W_s||^2`` (Evgeniou & Pontil 2004; equal to the
      pairwise sum divided by T);
    - ``"trace"``: ``sum_g ||[vec W_1; ...; vec W_T]||_*``, the nuclear norm of the T-row matrix of
      the stacked tensors (the matrix form of Yang & Hospedales 2017's tensor trace norm).
    """
    total = layers[0][0].new_zeros(())
    for group in layers:
        w = torch.stack([p.reshape(-1) for p in group])  # (T, P)
        if penalty == "trace":
            total = total + torch.linalg.matrix_norm(w, ord="nuc")
        else:
            centred = w - w.mean(0, keepdim=True)
            sq = centred.pow(2).sum()
            total = total + (sq * w.shape[0] if penalty == "l2" else sq)
    return total


@register("soft_sharing")
class SoftSharing(MultiTaskModule):
    """Soft parameter sharing: T networks of one architecture, ``loss = sum_t L_t(W_t) +
    strength * R(W_1..W_T)`` (Duong, Cohn, Bird, Cook, "Low Resource Dependency Parsing:
    Cross-lingual Parameter Sharing in a Neural Network Parser", ACL 2015, for the pairwise L2
    form; Evgeniou & Pontil, KDD 2004, for the mean-regularised one; Yang & Hospedales, ICLR 2017,
    for trace-norm coupling).

    Args:
        in_features: input width, or the shape of one example (read flattened).
        tasks: the task set (or task names).
        hidden_dims: hidden widths of every task network (a ``Linear`` to ``out_features``
            follows).
        out_features, activation, dropout, batch_norm: as in SharedBottom.
        penalty: ``"l2"``, ``"mean"`` or ``"trace"`` (:func:`coupling_penalty`).
        strength: the penalty's weight lambda (0: independent networks; mtlkit default 1e-3,
            no canonical value exists).
        coupled: ``"hidden"`` (every layer but the output layer; the default, since outputs may
            differ in size) or ``"all"`` (every ``Linear``; outputs must have one size).

    The penalty is returned as the auxiliary loss ``soft_sharing`` in training mode (the method
    adds it with weight 1). Nothing is shared in the contract's sense: every network is its task's own, so a
    gradient method has nothing to combine and each network gets its own gradient. The
    representation is per task, each network's last hidden layer.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        hidden_dims: Sequence[int] = (64, 32),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        penalty: str = "l2",
        strength: float = 1e-3,
        coupled: str = "hidden",
    ) -> None:
        super().__init__(tasks)
        if penalty not in PENALTIES:
            raise unknown_name("penalty", penalty, PENALTIES)
        if coupled not in COUPLED:
            raise unknown_name("coupled", coupled, COUPLED)
        if not strength >= 0:
            raise ConfigError(f"SoftSharing: strength must be >= 0, got {strength}.")
        outs = resolve_out_features(self.task_names, out_features)
        if coupled == "all" and len(set(outs.values())) > 1:
            raise ConfigError("SoftSharing(coupled='all') needs one out_features for every task.")
        if coupled == "hidden" and not hidden_dims:
            raise ConfigError("SoftSharing(coupled='hidden') needs hidden layers (hidden_dims).")
        self.penalty, self.strength, self.coupled = penalty, float(strength), coupled
        self.in_features = in_features
        self.inputs = ExpertInputs(in_features)
        width = self.inputs.expert_width
        self.bodies = nn.ModuleDict(
            {t: mlp(width, hidden_dims, activation, dropout, batch_norm) for t in self.task_names}
        )
        last = hidden_dims[-1] if hidden_dims else width
        self.outputs = nn.ModuleDict({t: nn.Linear(last, outs[t]) for t in self.task_names})

    def shared_modules(self) -> Iterable[nn.Module]:
        return []

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.bodies[task], self.outputs[task]]

    def coupled_groups(self) -> list[list[Tensor]]:
        """The tied parameters: per layer and tensor, every task's copy."""
        mods = ("bodies", "outputs") if self.coupled == "all" else ("bodies",)
        groups: list[list[Tensor]] = []
        for mod in mods:
            per_task = [
                [p for p in getattr(self, mod)[t].parameters() if p.requires_grad] for t in self.task_names
            ]
            groups += [list(g) for g in zip(*per_task, strict=True)]
        return groups

    def regularization_loss(self) -> Tensor:
        """``strength * R(W_1..W_T)``: the coupling penalty, a function of the parameters alone
        (influence functions include it in the objective's Hessian)."""
        groups = self.coupled_groups()
        if not groups or len(self.task_names) < 2:
            return next(self.parameters()).new_zeros(())
        return self.strength * coupling_penalty(groups, self.penalty)

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        self.inputs.check(x, type(self).__name__)
        flat, _ = self.inputs(x)
        hidden = {t: self.bodies[t](flat) for t in tasks}
        out = {t: self.outputs[t](hidden[t]) for t in tasks}
        aux = None
        if self.training and self.strength > 0 and len(self.task_names) > 1 and self.coupled_groups():
            aux = {"soft_sharing": self.regularization_loss()}
        return MultiTaskOutput(out, hidden if self.bodies[tasks[0]] else None, aux)
