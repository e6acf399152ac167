"""AITM: adaptive information transfer between the steps of a conversion funnel."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, TaskError
from mtlkit.models.base import ACTIVATIONS, MultiTaskModule, MultiTaskOutput, mlp, register
from mtlkit.models.funnel import check_funnel_tasks
from mtlkit.models.gating import ExpertInputs, shared_cut


def tower(width: int, dims: Sequence[int], activation: str, dropout: Sequence[float]) -> nn.Sequential:
    """``Linear -> activation -> Dropout(p_l)`` per layer (the official towers' per-layer dropout)."""
    layers: list[nn.Module] = []
    for d, p in zip(dims, dropout, strict=True):
        layers += [nn.Linear(width, d), ACTIVATIONS[activation]()]
        if p > 0:
            layers.append(nn.Dropout(p))
        width = d
    return nn.Sequential(*layers)


class InformationTransfer(nn.Module):
    """The AIT module: self-attention over the two candidates ``[q_t ; p_{t-1}]`` (the task's own
    tower output and the information transferred from the previous step), ``z = sum_u w_u V u``
    with ``w = softmax(<Q u, K u> / sqrt(d))``; Q, K, V are d x d without bias, initialised
    N(0, 0.01^2) as in the official code."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        for layer in (self.q, self.k, self.v):
            nn.init.normal_(layer.weight, std=0.01)

    def forward(self, own: Tensor, transferred: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.stack([own, transferred], dim=1)  # (B, 2, d)
        scores = (self.q(u) * self.k(u)).sum(-1) / math.sqrt(u.shape[-1])
        w = torch.softmax(scores, dim=1)
        return (w.unsqueeze(-1) * self.v(u)).sum(1), w


@register("aitm")
class AITM(MultiTaskModule):
    """AITM (Xi, Chen, Yan, Pan, Zhu, Ge, Zhang, Zheng, Lin, Zhuang, "Modeling the Sequential
    Dependence among Audience Multi-step Conversions with Multi-task Learning in Targeted Display
    Advertising", KDD 2021).

    Tasks are the steps of a funnel in order (e.g. impression -> click -> purchase). A shared
    embedding feeds one tower per step; step t > 1 fuses its tower output with information
    transferred from step t-1 (an MLP of step t-1's fused representation) by the AIT attention,
    and every step's logit comes from a ``Linear`` on its fused representation. The behavioural
    expectation calibrator ``alpha * sum_t mean(max(p_t - p_{t-1}, 0))`` (a later step is not
    more likely than an earlier one) is returned as the auxiliary loss ``aitm_calibrator``.

    Defaults from the official code: towers 128-64-32 with dropout 0.1/0.3/0.3 (keep
    probabilities 0.9/0.7/0.7), a 32-wide transfer layer with dropout 0.3, calibrator weight
    ``alpha = 0.6``. Departure: the official embedding is a lookup of sparse ids; here
    ``embed_dims`` is a shared MLP on dense features (mtlkit default (64,)).

    Args:
        in_features: input width, or the shape of one example.
        tasks: at least two binary funnel tasks, in order.
        embed_dims: the shared embedding MLP (at least one layer).
        tower_dims, tower_dropout: each step's tower (the last width is the AIT width).
        calibration: the calibrator's weight alpha (0: off).
        activation: hidden activation.

    What is shared: the embedding, and every step's tower, transfer layer and AIT but the last
    step's (step s feeds steps s+1, ... through the transfer); the heads and the last step's
    modules are each task's own. The representation is the embedding and the fused
    representations of every step but the last, concatenated. Departure: one AIT module per step
    (the official multi-step code shares one across steps; the same model for two steps), so that
    nothing shared is read above the representation.
    """

    funnel = True

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        embed_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (128, 64, 32),
        tower_dropout: Sequence[float] = (0.1, 0.3, 0.3),
        calibration: float = 0.6,
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
    ) -> None:
        check_funnel_tasks(tasks, out_features, "AITM", least=2)
        super().__init__(tasks)
        if not embed_dims or not tower_dims:
            raise TaskError("AITM needs a shared embedding (embed_dims) and towers (tower_dims).")
        if len(tower_dropout) != len(tower_dims):
            raise ConfigError(f"AITM: tower_dropout needs one rate per tower layer ({len(tower_dims)}).")
        if not calibration >= 0:
            raise ConfigError(f"AITM: calibration must be >= 0, got {calibration}.")
        self.calibration = float(calibration)
        self.in_features = in_features
        self.inputs = ExpertInputs(in_features)
        self.embedding = mlp(self.inputs.expert_width, embed_dims, activation)
        width = tower_dims[-1]
        names = self.task_names
        self.towers = nn.ModuleDict(
            {t: tower(embed_dims[-1], tower_dims, activation, tower_dropout) for t in names}
        )
        self.transfers = nn.ModuleDict(
            {t: tower(width, [width], activation, [tower_dropout[-1]]) for t in names[1:]}
        )
        self.ait = nn.ModuleDict({t: InformationTransfer(width) for t in names[1:]})
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1) for t in names})
        self.last_attention: dict[str, Tensor] = {}

    def shared_modules(self) -> Iterable[nn.Module]:
        mods: list[nn.Module] = [self.embedding]
        for s in self.task_names[:-1]:  # every step but the last feeds the steps after it
            mods.append(self.towers[s])
            if s in self.ait:
                mods += [self.transfers[s], self.ait[s]]
        return mods

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        mods: list[nn.Module] = [self.heads[task]]
        if task == self.task_names[-1]:
            mods.append(self.towers[task])
            if task in self.ait:
                mods += [self.transfers[task], self.ait[task]]
        return mods

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        self.inputs.check(x, type(self).__name__)
        self.last_attention.clear()
        e = self.embedding(self.inputs(x)[0])
        names = self.task_names
        last = max(names.index(t) for t in tasks)
        # steps before the last one are read by every later step: they are shared, and their
        # fused representations form the shared tensor with the embedding
        fused: list[Tensor] = []
        for t in names[: min(last + 1, len(names) - 1)]:
            own = self.towers[t](e)
            if not fused:
                fused.append(own)
            else:
                f, w = self.ait[t](own, self.transfers[t](fused[-1]))
                self.last_attention[t] = w.detach()
                fused.append(f)
        z, views = shared_cut([e, *fused])
        e, fused = views[0], views[1:]
        if last == len(names) - 1:
            t = names[-1]
            own = self.towers[t](e)
            if fused:
                f, w = self.ait[t](own, self.transfers[t](fused[-1]))
                self.last_attention[t] = w.detach()
                fused.append(f)
            else:
                fused.append(own)
        logits = {t: self.heads[t](fused[names.index(t)]) for t in tasks}
        aux = None
        if self.calibration > 0 and self.training and len(tasks) == len(names):
            probs = [torch.sigmoid(logits[t]) for t in names]
            gaps = torch.stack([(b - a).clamp_min(0).mean() for a, b in itertools.pairwise(probs)])
            aux = {"aitm_calibrator": self.calibration * gaps.sum()}
        return MultiTaskOutput(logits, z, aux)

    def routing_statistics(self) -> dict[str, float]:
        """``transfer/<task>``: the mean attention weight on the transferred information."""
        return {f"transfer/{t}": float(w[:, 1].double().mean()) for t, w in self.last_attention.items()}
