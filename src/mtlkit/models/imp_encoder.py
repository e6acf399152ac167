"""IMP's single modality-agnostic sparse-MoE encoder, for training with alternating task steps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, ShapeMismatchError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, register, resolve_out_features
from mtlkit.models.m3vit import FeatureTokens, TransformerBlock
from mtlkit.models.moe import MoEMLP, NoisyTopKRouter, load_statistics


@register("imp_encoder")
class IMPEncoder(MultiTaskModule):
    """The encoder of IMP: Akbari, Kondratyuk, Cui, Hornung, Wang, Adam, "Alternating Gradient
    Descent and Mixture-of-Experts for Integrated Multimodal Perception", NeurIPS 2023.

    One transformer encoder for every modality, with minimal modality-specific parts: each
    modality has its own tokenizer (a patch embedding for images, one token per feature for
    vectors) and a learned modality embedding added to its tokens; everything after is shared, with
    every other block's MLP a sparse mixture of experts (top-k token routing by a V-MoE router that
    does not see the modality or the task: the experts specialise by what the tokens carry). The
    mean of the final tokens feeds each task's head. ``modalities`` maps a modality name to the
    shape of one example (an int for vectors, (C, H, W) for images); ``task_modality`` says which
    modality each task reads. A forward pass recognises the modality by the input's shape and
    predicts the tasks of that modality only -- made for multi-input training with one task per
    step (:class:`~mtlkit.data.MultiInputLoader` with a schedule, the paper's AGD), where each
    batch holds one task's inputs.

    A reconstruction at CPU size from the paper (its exact router and sizes are not public in this
    form): dim 64, depth 4, 8 experts, top-2 (``renormalize`` off, as V-MoE), balancing weight 0.01.
    """

    def __init__(
        self,
        in_features: int | Sequence[int] | None,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 1,
        modalities: Mapping[str, int | Sequence[int]] | None = None,
        task_modality: Mapping[str, str] | None = None,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch_size: int = 4,
        num_experts: int = 8,
        top_k: int = 2,
        aux_weight: float = 0.01,
    ) -> None:
        super().__init__(tasks)
        if modalities is None:  # one modality read by every task (the registry's default)
            if in_features is None:
                raise ConfigError("imp_encoder needs in_features or modalities.")
            modalities = {"input": in_features if isinstance(in_features, int) else tuple(in_features)}
        self.shapes = {
            m: (s,) if isinstance(s, int) else tuple(int(d) for d in s) for m, s in modalities.items()
        }
        if len(set(self.shapes.values())) != len(self.shapes):
            raise ConfigError(f"imp_encoder tells modalities apart by shape; two share one: {self.shapes}.")
        only = next(iter(self.shapes)) if len(self.shapes) == 1 else None
        if task_modality is None and only is None:
            raise ConfigError("imp_encoder with several modalities needs task_modality.")
        self.task_modality: dict[str, str] = dict(task_modality or {t: str(only) for t in self.task_names})
        unknown = {t: m for t, m in self.task_modality.items() if m not in self.shapes}
        if set(self.task_modality) != set(self.task_names) or unknown:
            raise ConfigError(
                f"task_modality must give every task one of {list(self.shapes)}; got {task_modality}."
            )
        self.in_features = next(iter(self.shapes.values())) if only else None
        self.aux_weight = aux_weight
        tokenizers: dict[str, nn.Module] = {}
        counts = {}
        for m, shape in self.shapes.items():
            if len(shape) == 1:
                tokenizers[m], counts[m] = FeatureTokens(shape[0], dim), shape[0]
            elif len(shape) == 3 and shape[1] % patch_size == 0 and shape[2] % patch_size == 0:
                tokenizers[m] = nn.Conv2d(shape[0], dim, patch_size, stride=patch_size)
                counts[m] = (shape[1] // patch_size) * (shape[2] // patch_size)
            else:
                raise ConfigError(
                    f"imp_encoder: modality {m!r} needs a vector width or (C, H, W) divisible by patch_size."
                )
        self.tokenizers = nn.ModuleDict(tokenizers)
        self.modality_embedding = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(1, 1, dim)) for m in self.shapes}
        )
        self.positions = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(1, n, dim) * 0.02) for m, n in counts.items()}
        )
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(dim, heads, 2 * dim, MoEMLP(dim, dim, num_experts) if i % 2 else None, 0.0)
                for i in range(depth)
            ]
        )
        self.routers = nn.ModuleList(
            [NoisyTopKRouter(dim, num_experts, top_k) for i in range(depth) if i % 2]
        )
        self.norm = nn.LayerNorm(dim)
        outs = resolve_out_features(self.task_names, out_features)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, outs[t]) for t in self.task_names})
        self.last_load: dict[str, Tensor] = {}

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.tokenizers, self.blocks, self.routers, self.norm]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.modality_embedding.values(), *self.positions.values(), *super().shared_parameters()]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.heads[task]]

    def modality_of(self, x: Tensor) -> str:
        shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else None
        for m, s in self.shapes.items():
            if shape == s:
                return m
        raise ShapeMismatchError(f"IMPEncoder reads {self.shapes}; got an input of shape {shape}.")

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        modality = self.modality_of(x)
        if tasks and all(self.task_modality[t] != modality for t in tasks):
            raise ShapeMismatchError(
                f"IMPEncoder: the input is of modality {modality!r}, which none of the tasks {tasks} reads "
                f"(they read {sorted({self.task_modality[t] for t in tasks})})."
            )
        tokens = self.tokenizers[modality](x)
        if tokens.dim() == 4:  # a patch embedding: (B, dim, h, w) -> (B, h*w, dim)
            tokens = tokens.flatten(2).transpose(1, 2)
        h = tokens + self.positions[modality] + self.modality_embedding[modality]
        balance, load = h.new_zeros(()), cast(list[Tensor], [])
        for block in (cast(TransformerBlock, b) for b in self.blocks):
            h, routing = block(
                h, cast(NoisyTopKRouter, self.routers[len(load)]) if block.moe is not None else None
            )
            if routing is not None:
                balance = balance + routing.loss
                load.append(routing.load)
        self.last_load[modality] = torch.stack(load)
        z = self.norm(h).mean(1)
        mine = [t for t in tasks if self.task_modality[t] == modality]
        aux = (
            {f"moe_balance/{modality}": self.aux_weight * balance}
            if self.training and self.aux_weight
            else None
        )
        return MultiTaskOutput({t: self.heads[t](z) for t in mine}, z, aux)

    def routing_statistics(self) -> dict[str, float]:
        """Per modality: the share of experts used and the largest expert's share of the tokens."""
        return load_statistics(self.last_load, cast(NoisyTopKRouter, self.routers[0]).top_k)

    def example_input(self, batch: int = 4) -> Tensor:
        return torch.randn(batch, *next(iter(self.shapes.values())))
