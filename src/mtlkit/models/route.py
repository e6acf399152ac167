"""Per-sample routing over modality paths and task-sharing strategies ("Learning to Route")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, InputError, ShapeMismatchError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, mlp, register, resolve_out_features
from mtlkit.models.moe import cv_squared

SHARING = ("shared", "independent")


@register("learning_to_route")
class LearningToRoute(MultiTaskModule):
    """Learning to Route: Ajirak, Bein, Bowen, Kanellopoulos, Falk, Gunning, Solomonov, Grosenick,
    "Learning to Route: Per-Sample Adaptive Routing for Multimodal Multitask Prediction", NeurIPS
    2025. A **reconstruction** from the abstract (no official code was found): the paper's design
    of per-sample choices among modality processing paths and task-sharing strategies, in the form
    of the specification this library follows.

    The input concatenates the modalities (``modality_dims``); a modality whose values are all NaN
    in a sample is missing there. Paths: each modality's encoder (an MLP to ``hidden``) and a fused
    path (an MLP over the concatenated encodings). Per path two sharing strategies: one head whose
    output serves every task (``shared``: the tasks are tied to one prediction) or one head per task
    (``independent``); tasks with different output widths have no common output to tie, so then
    only the independent strategy exists (the shared combinations get probability 0). A router
    reads the encodings (zero where missing) and the missingness flags and gives every sample a
    softmax over the ``paths x 2`` combinations (temperature ``temperature``); a path that uses a
    missing modality gets probability exactly 0 (the fused path uses all of them). Task t's
    prediction is ``sum_{p,s} r[p, s] * head_{p,s,t}(h_p)`` (soft routing; with
    ``hard_inference=True`` evaluation uses the arg-max combination only). ``aux_weight x`` the
    squared coefficient of variation of the batch's mean routing is the auxiliary loss
    ``route_balance`` (against collapse onto one combination).

    The representation is one tensor every task reads: the path encodings, the routing and the
    shared heads' outputs, concatenated (the independent heads read their slices of it).
    ``routing_statistics()`` logs the mean routing mass of each path and strategy.
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 1,
        modality_dims: Sequence[int] | None = None,
        hidden: int = 32,
        temperature: float = 1.0,
        aux_weight: float = 0.01,
        hard_inference: bool = False,
    ) -> None:
        super().__init__(tasks)
        dims = [int(d) for d in (modality_dims or [in_features - in_features // 2, in_features // 2])]
        if len(dims) < 2 or any(d < 1 for d in dims) or sum(dims) != in_features:
            raise ConfigError(
                f"modality_dims must be >= 2 positive widths adding up to in_features={in_features}; got {dims}."
            )
        if not temperature > 0 or aux_weight < 0:
            raise ConfigError(
                f"temperature must be > 0 and aux_weight >= 0; got {temperature}, {aux_weight}."
            )
        self.in_features, self.dims, self.hidden = in_features, dims, hidden
        self.temperature, self.aux_weight, self.hard_inference = temperature, aux_weight, hard_inference
        self.paths = [f"modality{m}" for m in range(len(dims))] + ["fused"]
        self.encoders = nn.ModuleList([mlp(d, [hidden], "relu") for d in dims])
        self.fusion = mlp(hidden * len(dims), [hidden], "relu")
        self.outs = resolve_out_features(self.task_names, out_features)
        widths = set(self.outs.values())
        #: one output width for every task: the shared strategy ties them to one head per path
        self.can_share = len(widths) == 1
        self.width = next(iter(widths))
        self.shared_heads = nn.ModuleList(
            [nn.Linear(hidden, self.width) for _ in self.paths] if self.can_share else []
        )
        self.independent_heads = nn.ModuleDict(
            {t: nn.ModuleList([nn.Linear(hidden, self.outs[t]) for _ in self.paths]) for t in self.task_names}
        )
        self.router = nn.Linear(hidden * len(dims) + len(dims), 2 * len(self.paths))
        self.last_routing: Tensor | None = None

    # -- the contract -------------------------------------------------------------------------------
    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.encoders, self.fusion, self.shared_heads, self.router]  # (no shared heads: empty)

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.independent_heads[task]]

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeMismatchError(
                f"LearningToRoute expects (batch, {self.in_features}) inputs, got {got}."
            )
        routing, encodings = self.route(x)
        shared_out = [head(h) for head, h in zip(self.shared_heads, encodings, strict=False)]  # (B, width)
        z = torch.cat([*encodings, routing, *shared_out], dim=1)  # what every task reads
        p, hidden = len(self.paths), self.hidden
        hs = [z[:, i * hidden : (i + 1) * hidden] for i in range(p)]
        r = z[:, p * hidden : p * hidden + 2 * p].view(-1, p, 2)
        shared = z[:, p * hidden + 2 * p :].view(-1, p, self.width) if self.can_share else None
        if self.hard_inference and not self.training:
            r = torch.nn.functional.one_hot(r.flatten(1).argmax(1), 2 * p).to(r.dtype).view(-1, p, 2)
        predictions = {}
        for t in tasks:
            heads = cast(nn.ModuleList, self.independent_heads[t])
            own = torch.stack([head(h) for head, h in zip(heads, hs, strict=True)], dim=1)
            mixed = r[:, :, 1:] * own
            if shared is not None:
                mixed = mixed + r[:, :, :1] * shared
            predictions[t] = mixed.sum(1)
        aux = None
        if self.training and self.aux_weight > 0:
            aux = {"route_balance": self.aux_weight * cv_squared(routing.mean(0))}
        return MultiTaskOutput(predictions, z, aux)

    def route(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The (B, paths x 2) routing (columns: path-major, then shared/independent) and the paths'
        encodings (B, hidden) each."""
        parts = torch.split(x, self.dims, dim=1)
        missing = torch.stack([torch.isnan(part).all(1) for part in parts], dim=1)  # (B, M)
        partial = torch.stack([torch.isnan(part).any(1) for part in parts], dim=1) & ~missing
        if bool(partial.any()):
            b, m = (int(i) for i in torch.nonzero(partial)[0])
            raise InputError(
                f"LearningToRoute: sample {b} has NaN in some but not all features of modality {m}; a "
                "missing modality is all NaN (impute partial gaps before the model)."
            )
        if bool(missing.all(1).any()):
            b = int(torch.nonzero(missing.all(1))[0])
            raise InputError(
                f"LearningToRoute: every modality of sample {b} is missing (all NaN): nothing to route."
            )
        encodings = [
            enc(torch.nan_to_num(part)) * (~missing[:, m : m + 1]).to(x.dtype)
            for m, (enc, part) in enumerate(zip(self.encoders, parts, strict=True))
        ]
        fused = self.fusion(torch.cat(encodings, dim=1))
        logits = self.router(torch.cat([*encodings, missing.to(x.dtype)], dim=1)) / self.temperature
        unavailable = torch.cat([missing, missing.any(1, keepdim=True)], dim=1)  # fused needs every modality
        mask = unavailable.repeat_interleave(2, dim=1)
        if not self.can_share:  # no common output to tie: the shared combinations do not exist
            mask = mask | torch.tensor([True, False], device=x.device).repeat(len(self.paths))
        logits = logits.masked_fill(mask, float("-inf"))
        routing = torch.softmax(logits, dim=1)
        self.last_routing = routing.detach()
        return routing, [*encodings, fused]

    def pin_path(self, path: int) -> None:
        """Fix the routing to one path (both sharing strategies equally; the router no longer
        trains, no balancing loss): the model becomes that fixed path, the baseline routing beats."""
        if not 0 <= path < len(self.paths):
            raise ConfigError(f"path must be in [0, {len(self.paths)}), got {path}.")
        self.aux_weight = 0.0
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.fill_(-30.0)
            self.router.bias[2 * path : 2 * path + 2] = 30.0
        self.router.requires_grad_(False)

    def routing_statistics(self) -> dict[str, float]:
        if self.last_routing is None:
            return {}
        r = self.last_routing.view(-1, len(self.paths), 2).mean(0)
        out = {f"route/{path}": float(r[i].sum()) for i, path in enumerate(self.paths)}
        out.update({f"route/{mode}": float(r[:, j].sum()) for j, mode in enumerate(SHARING)})
        return out
