"""What the gated-expert models (MMoE, CGC/PLE, DSelect-k, HoME) share: the optional shared stem and
what the gates read, the representation cut, and the gate statistics they log."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError, ShapeMismatchError, unknown_name
from mtlkit.models.base import mlp

#: what a gate reads: the model input (flattened), the shared stem's output, or the input averaged
#: over its trailing (spatial) dimensions
GATE_INPUTS = ("input", "stem", "pooled")
#: how a gated model exposes its representation to representation-level methods
REPRESENTATIONS = ("stacked", "per_task")


class ExpertInputs(nn.Module):
    """The input side of a gated-expert model: an optional shared stem (the "shared embedding" of
    the recommender literature) that the experts read, and the tensor the gates read.

    Args:
        in_features: width of a (batch, in_features) input, or the shape of one example, e.g.
            (C, H, W); experts read it flattened (through the stem when there is one).
        stem_dims: hidden widths of a shared MLP stem ((): none).
        gate_input: ``"input"`` (the raw input, flattened: MMoE's and LibMTL's gate),
            ``"stem"`` (the stem's output) or ``"pooled"`` (the input averaged over every
            dimension after the channel one, for (B, C, ...) inputs).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        stem_dims: Sequence[int] = (),
        gate_input: str = "input",
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise unknown_name("gate_input", gate_input, GATE_INPUTS)
        shape = (int(in_features),) if isinstance(in_features, int) else tuple(int(d) for d in in_features)
        if not shape or any(d < 1 for d in shape):
            raise ConfigError(f"in_features must be positive, got {in_features}.")
        if gate_input == "stem" and not stem_dims:
            raise ConfigError("gate_input='stem' needs a shared stem: give stem_dims.")
        if gate_input == "pooled" and len(shape) < 2:
            raise ConfigError(
                "gate_input='pooled' averages over the dimensions after the channel one: give "
                "in_features as the shape of one example, e.g. (C, H, W)."
            )
        self.shape = shape
        self.gate_input = gate_input
        flat = math.prod(shape)
        self.stem = mlp(flat, stem_dims, activation, dropout, batch_norm) if stem_dims else None
        self.expert_width = stem_dims[-1] if stem_dims else flat
        self.gate_width = {"input": flat, "stem": self.expert_width, "pooled": shape[0]}[gate_input]

    @property
    def gate_reads_shared(self) -> bool:
        """Whether the gate input depends on shared parameters (then it is part of the cut)."""
        return self.gate_input == "stem"

    def check(self, x: Tensor, model: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeMismatchError(
                f"{model} expects inputs of shape (batch, {', '.join(map(str, self.shape))}), got {got}."
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(expert input, gate input)``."""
        flat = x.flatten(1)
        expert_in = self.stem(flat) if self.stem is not None else flat
        if self.gate_input == "stem":
            return expert_in, expert_in
        if self.gate_input == "pooled":
            return expert_in, x.flatten(2).mean(-1)
        return expert_in, flat


def shared_cut(parts: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One representation tensor from the shared tensors the task-specific part reads, and views
    of it in their original shapes for the task-specific part to read instead.

    Representation-level methods need one tensor below which every parameter is shared; when the
    task branches read several shared tensors (expert outputs, and a gate input computed by the
    shared stem), their flattened concatenation is that tensor (one copy per forward)."""
    if len(parts) == 1:
        return parts[0], [parts[0]]
    batch = parts[0].shape[0]
    sizes = [math.prod(p.shape[1:]) for p in parts]
    z = torch.cat([p.reshape(batch, n) for p, n in zip(parts, sizes, strict=True)], dim=1)
    views = [v.view(p.shape) for v, p in zip(torch.split(z, sizes, dim=1), parts, strict=True)]
    return z, views


def softmax_gate_statistics(
    gates: Mapping[str, Tensor], expert_names: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Per task: the mean gate weight on each expert it sees (``gate/<task>/<expert>``), the
    largest mean weight (``gate/<task>/max``: near 1 means the gate has collapsed onto one expert)
    and the mean normalised entropy of the per-sample gates (``gate/<task>/entropy``: 1 = uniform,
    0 = one expert per sample)."""
    stats: dict[str, float] = {}
    for task, g in gates.items():
        g = g.detach().double()
        g = g.reshape(-1, g.shape[-1])
        mean = g.mean(0)
        names = expert_names.get(task) or [str(i) for i in range(g.shape[-1])]
        for name, value in zip(names, mean.tolist(), strict=True):
            stats[f"gate/{task}/{name}"] = value
        stats[f"gate/{task}/max"] = float(mean.max())
        if g.shape[-1] > 1:
            entropy = -(g * g.clamp_min(1e-300).log()).sum(-1).mean() / math.log(g.shape[-1])
            stats[f"gate/{task}/entropy"] = float(entropy)
    return stats


def zero_fraction(outputs: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
    """``experts/<name>/zeros``: the fraction of exactly-zero entries in each expert's output (a
    ReLU expert that outputs mostly zeros is HoME's "expert collapse")."""
    return {f"experts/{name}/zeros": float((out.detach() == 0).double().mean()) for name, out in outputs}


__all__ = [
    "GATE_INPUTS",
    "REPRESENTATIONS",
    "ExpertInputs",
    "shared_cut",
    "softmax_gate_statistics",
    "zero_fraction",
]
