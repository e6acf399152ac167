"""M3ViT: a vision transformer whose every other block is a task-routed mixture of experts."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, ShapeMismatchError, unknown_name
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, register, resolve_out_features
from mtlkit.models.conv import check_image, image_channels
from mtlkit.models.moe import MoEMLP, NoisyTopKRouter, Routing, load_statistics

ROUTERS = ("multi_gate", "task_conditioned")


class TransformerBlock(nn.Module):
    """A pre-norm transformer block; its MLP is dense or a routed mixture of experts."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, moe: MoEMLP | None, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.moe = moe
        self.mlp = (
            None
            if moe is not None
            else nn.Sequential(
                nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_hidden, dim)
            )
        )

    def attend(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        return x + self.attn(h, h, h, need_weights=False)[0]

    def forward(
        self, x: Tensor, route: Callable[[Tensor], Routing] | None = None, dense: bool = False
    ) -> tuple[Tensor, Routing | None]:
        """The block on tokens ``x``; a mixture-of-experts block routes its flattened tokens with
        ``route`` (``dense``: every expert runs, the reference path). Returns the routing too."""
        h = self.attend(x)
        normed = self.norm2(h)
        if self.moe is None:
            assert self.mlp is not None
            return h + self.mlp(normed), None
        if route is None:
            raise ConfigError("A mixture-of-experts block needs a router.")
        flat = normed.reshape(-1, normed.shape[-1])
        routing = route(flat)
        mixed = self.moe.dense(flat, routing) if dense else self.moe(flat, routing)
        return h + mixed.view_as(normed), routing


@register("m3vit")
class M3ViT(MultiTaskModule):
    """M3ViT: Liang, Fan, Kumar, Chen, Li, Cong, Yang, Wang, "M3ViT: Mixture-of-Experts Vision
    Transformer for Efficient Multi-task Learning with Model-Accelerator Co-design", NeurIPS 2022.

    A ViT whose odd-indexed blocks (1, 3, ...) replace their MLP by a mixture of ``num_experts``
    GELU experts (``dim -> moe_mlp_ratio * dim -> dim``), routed per token by V-MoE's noisy top-k
    router (:mod:`mtlkit.models.moe`) that depends on the task: one router per task
    (``router="multi_gate"``) or one shared router reading ``[token; e_t]`` with a learned task
    embedding ``e_t = MLP(one-hot(t))`` (``"task_conditioned"``). The backbone runs once per task,
    with that task's routing, as in the official ``one_by_one`` training; task t's representation
    is its pass's class token after the final LayerNorm (``representation`` is ``{task: tensor}``)
    and its head reads it. Each pass adds ``aux_weight x`` the sum of its routers' balancing losses
    (``cv^2(importance) + cv^2(load)``) as the auxiliary loss ``moe_balance/<task>``, in training.
    Single-task inference, ``model(x, task=t)``, runs one pass in which each token executes only
    its k experts; :meth:`prune` drops the experts a task never selects on calibration inputs.

    Official defaults kept: 16 experts, top-4, ``moe_mlp_ratio`` 1, noise std 0 (the README's run),
    multi-gate routers, balancing weight 0.01, no renormalisation of the kept gates. At our CPU size
    the backbone is small (``dim`` 64, depth 4, 4 heads, patch 4; DeiT-S: 384, 12, 6, 16).
    Departures: ``num_tasks`` comes from the task set (the code infers it from a gate width); a
    pure-PyTorch dispatch replaces FastMoE (tested against the dense mixture); the official
    training calls backward once per task, while an mtlkit step back-propagates all tasks' passes
    together (the same gradient under equal weighting, with every pass's graph alive at once);
    the smooth load estimate takes its thresholds from logits (see :mod:`mtlkit.models.moe`); a
    flat ``(batch, F)`` input is read as F tokens, one per feature (a linear embedding of each
    value plus a position embedding), so the model also serves tabular tasks.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 1,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        patch_size: int = 4,
        num_experts: int = 16,
        top_k: int = 4,
        moe_mlp_ratio: float = 1.0,
        router: str = "multi_gate",
        task_embed_dim: int = 16,
        noise_std: float = 0.0,
        aux_weight: float = 0.01,
        renormalize_topk: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        if router not in ROUTERS:
            raise unknown_name("router", router, ROUTERS)
        if depth < 2 or dim % heads or aux_weight < 0:
            raise ConfigError(
                f"m3vit needs depth >= 2 (a MoE block at odd positions), dim divisible by heads and "
                f"aux_weight >= 0; got depth={depth}, dim={dim}, heads={heads}, aux_weight={aux_weight}."
            )
        self.router_kind, self.aux_weight = router, float(aux_weight)
        self.num_experts, self.top_k = num_experts, top_k
        self.in_features: int | tuple[int, ...]
        if isinstance(in_features, int):  # tabular: one token per feature
            self.in_features, self.image_shape, self.channels = int(in_features), None, None
            self.embed: nn.Module = FeatureTokens(int(in_features), dim)
            tokens = int(in_features)
        else:
            channels, shape = image_channels(in_features, "m3vit")
            assert shape is not None
            if shape[1] % patch_size or shape[2] % patch_size:
                raise ConfigError(
                    f"m3vit: image size {shape[1:]} must be a multiple of patch_size={patch_size}."
                )
            self.in_features, self.image_shape, self.channels = shape, shape, channels
            self.embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
            tokens = (shape[1] // patch_size) * (shape[2] // patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        hidden = int(dim * mlp_ratio)
        expert_hidden = max(1, int(dim * moe_mlp_ratio))
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(
                    dim, heads, hidden, MoEMLP(dim, expert_hidden, num_experts) if i % 2 else None, dropout
                )
                for i in range(depth)
            ]
        )
        self.moe_blocks = [i for i in range(depth) if i % 2]
        width = dim + (task_embed_dim if router == "task_conditioned" else 0)
        if router == "multi_gate":
            self.routers = nn.ModuleDict(
                {
                    t: nn.ModuleList(
                        [
                            NoisyTopKRouter(width, num_experts, top_k, noise_std, renormalize_topk)
                            for _ in self.moe_blocks
                        ]
                    )
                    for t in self.task_names
                }
            )
        else:
            self.shared_routers = nn.ModuleList(
                [
                    NoisyTopKRouter(width, num_experts, top_k, noise_std, renormalize_topk)
                    for _ in self.moe_blocks
                ]
            )
            self.task_embedding = nn.Sequential(
                nn.Linear(len(self.task_names), task_embed_dim),
                nn.GELU(),
                nn.Linear(task_embed_dim, task_embed_dim),
            )
        self.norm = nn.LayerNorm(dim)
        outs = resolve_out_features(self.task_names, out_features)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, outs[t]) for t in self.task_names})
        self.last_load: dict[str, Tensor] = {}
        #: each task's row of the task-conditioned router's one-hot input (kept by a pruned copy)
        self.task_index = {t: i for i, t in enumerate(self.task_names)}

    # -- the contract -----------------------------------------------------------------------------
    def shared_modules(self) -> Iterable[nn.Module]:
        shared: list[nn.Module] = [self.embed, self.blocks, self.norm]
        if self.router_kind == "task_conditioned":
            shared += [self.shared_routers, self.task_embedding]
        return shared

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        own: list[nn.Module] = [self.heads[task]]
        if self.router_kind == "multi_gate":
            own.append(self.routers[task])
        return own

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.cls, self.pos, *super().shared_parameters()]

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        tokens = self.tokens(x)
        predictions, reps, aux = {}, {}, {}
        for t in tasks:
            z, balance = self.encode(tokens, t)
            reps[t], predictions[t] = z, self.heads[t](z)
            if self.training and self.aux_weight > 0:
                aux[f"moe_balance/{t}"] = self.aux_weight * balance
        return MultiTaskOutput(predictions, reps, aux or None)

    # -- the backbone -----------------------------------------------------------------------------
    def tokens(self, x: Tensor) -> Tensor:
        """The patch (or feature) tokens with the class token and positions: (B, 1 + n, dim)."""
        if self.image_shape is None:
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ShapeMismatchError(f"M3ViT expects (batch, {self.in_features}) features, got {got}.")
            t = self.embed(x)
        else:
            check_image(x, int(self.channels or 0), self.image_shape, "M3ViT")
            t = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos

    def encode(self, tokens: Tensor, task: str, dense: bool = False) -> tuple[Tensor, Tensor]:
        """Task ``task``'s pass: its class token after the final norm, and the summed balancing loss
        of its routers. ``dense`` runs every expert (the reference for the sparse dispatch)."""
        h, balance = tokens, tokens.new_zeros(())
        load: list[Tensor] = []
        for block in self._blocks():
            m = len(load)  # this block's position among the routed ones
            h, routing = block(h, lambda flat, m=m: self._route(flat, task, m), dense)
            if routing is not None:
                balance = balance + routing.loss
                load.append(routing.load.detach())
        self.last_load[task] = torch.stack(load)
        return self.norm(h)[:, 0], balance

    def _blocks(self) -> list[TransformerBlock]:
        return [cast(TransformerBlock, b) for b in self.blocks]

    def _route(self, flat: Tensor, task: str, m: int) -> Routing:
        if self.router_kind == "multi_gate":
            return cast(nn.ModuleList, self.routers[task])[m](flat)
        onehot = F.one_hot(torch.tensor(self.task_index[task], device=flat.device), len(self.task_index))
        e = self.task_embedding(onehot.to(flat.dtype))
        return self.shared_routers[m](torch.cat([flat, e.expand(flat.shape[0], -1)], dim=1))

    # -- inference tools ----------------------------------------------------------------------------
    def selected_experts(self, x: Tensor, task: str) -> list[set[int]]:
        """Per MoE block, the experts that ``task``'s routing selects for any token of ``x``."""
        if task not in self.task_names:
            raise unknown_name("task", task, self.task_names)
        was_training = self.training
        self.eval()  # no gate noise, no dropout: the selection inference makes
        try:
            with torch.no_grad():
                self.encode(self.tokens(x), task)
        finally:
            self.train(was_training)
        return [set(torch.nonzero(row).squeeze(1).tolist()) for row in self.last_load[task]]

    def prune(self, task: str, calibration: Tensor) -> M3ViT:
        """A single-task copy for ``task`` holding only the experts its routing selects on the
        ``calibration`` inputs (the official static pruning): exact on those inputs; a token of
        another input routed to a removed expert gets no contribution from it (counted in each
        MoE layer's ``pruned_hits``)."""
        keep = self.selected_experts(calibration, task)
        pruned = copy.deepcopy(self)
        pruned.task_names = [task]
        for t in list(pruned.heads):
            if t != task:
                del pruned.heads[t]
                if pruned.router_kind == "multi_gate":
                    del pruned.routers[t]
        for block_index, kept in zip(pruned.moe_blocks, keep, strict=True):
            moe = pruned._blocks()[block_index].moe
            assert moe is not None
            moe.prune(kept)
        return pruned

    def routing_statistics(self) -> dict[str, float]:
        """Per task, over the last forward's MoE blocks: the share of experts that received a token
        and the largest share of the tokens one expert received; with several tasks in the last
        forward, ``moe/task_overlap``: the mean over MoE blocks and task pairs of the Jaccard index of
        the two tasks' used experts (1: the tasks share every expert; M3ViT's task-specific routing
        shows as a falling overlap)."""
        out = load_statistics(self.last_load, self.top_k)
        used = {t: load > 0 for t, load in self.last_load.items()}
        pairs = [(a, b) for i, a in enumerate(used) for b in list(used)[i + 1 :]]
        if pairs:
            jaccard = [
                float(((used[a] & used[b]).sum(1) / (used[a] | used[b]).sum(1).clamp_min(1)).mean())
                for a, b in pairs
            ]
            out["moe/task_overlap"] = sum(jaccard) / len(jaccard)
        return out

    def example_input(self, batch: int = 4) -> Tensor:
        dims: tuple[int, ...] = (
            (self.in_features,) if isinstance(self.in_features, int) else tuple(self.in_features)
        )
        return torch.randn(batch, *dims)


class FeatureTokens(nn.Module):
    """One token per input feature: ``value * w_f + b_f`` (FT-Transformer's numeric embedding)."""

    def __init__(self, features: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, dim) * 0.02)
        self.bias = nn.Parameter(torch.zeros(features, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, None] * self.weight + self.bias
