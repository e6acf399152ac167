"""Sparse mixture-of-experts MLPs with V-MoE's noisy top-k router, dispatched in pure PyTorch.

:class:`NoisyTopKRouter` follows the router of V-MoE that M3ViT uses (Riquelme et al., NeurIPS
2021; M3ViT's ``NoisyGate_VMoE``): ``logits = x W`` plus ``N(0, (noise_std / E)^2)`` noise in
training, ``p = softmax(logits)`` over *all* E experts, and the top-k of ``p`` kept **without**
renormalisation (``renormalize=True`` offers the renormalised variant), so the layer's output scale
depends on how peaked the router is, as in V-MoE. Its balancing loss is ``cv^2(importance) +
cv^2(load)`` (``cv^2 = var / mean^2``, unbiased variance, eps 1e-10): importance is the sum of the
kept gate values per expert; load is the number of tokens routed to each expert, or, in training
with noise, Shazeer et al.'s smooth estimate of it (the probability, under the noise, that the
expert is in a token's top-k). Departure: the official code compares the noisy *logits* with
thresholds taken from the top-(k+1) *softmax probabilities* in that estimate; we take the
thresholds from the noisy logits, where the estimate is defined.

:class:`MoEMLP` routes each token to its k experts with gather/scatter (no FastMoE); only the
experts that received tokens run. :meth:`MoEMLP.dense` computes every expert and mixes them with
the same gates: the reference the sparse path is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError


@dataclass
class Routing:
    """One router call: per token the kept experts and gate values, the full gate matrix, the
    balancing loss and the tokens per expert."""

    indices: Tensor  # (N, k)
    gates: Tensor  # (N, k)
    loss: Tensor  # scalar (0 outside training)
    load: Tensor  # (E,) tokens routed to each expert (a count)


def load_statistics(loads: Mapping[str, Tensor], top_k: int) -> dict[str, float]:
    """Routing statistics for the logs from each routing's tokens per expert (``(E,)``, or
    ``(blocks, E)`` for one routed layer per row; each token counts once for each of its ``top_k``
    experts): the share of experts that received a token and the largest share of a layer's tokens
    that one expert received (``top_k / E`` when balanced, 1 when every token goes to one expert)."""
    out: dict[str, float] = {}
    for key, load in loads.items():
        rows = load.reshape(-1, load.shape[-1]).float()
        tokens = (rows.sum(1, keepdim=True) / top_k).clamp_min(1)
        out[f"moe/{key}/experts_used"] = float((rows > 0).float().mean())
        out[f"moe/{key}/max_load_share"] = float((rows / tokens).max())
    return out


def cv_squared(x: Tensor) -> Tensor:
    """The squared coefficient of variation ``var / mean^2`` (unbiased variance, eps 1e-10)."""
    x = x.float()
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyTopKRouter(nn.Module):
    """V-MoE's noisy top-k router over ``num_experts`` experts for ``width``-wide tokens."""

    def __init__(
        self, width: int, num_experts: int, top_k: int, noise_std: float = 0.0, renormalize: bool = False
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}.")
        if noise_std < 0:
            raise ConfigError(f"noise_std must be >= 0, got {noise_std}.")
        self.num_experts, self.top_k = num_experts, top_k
        self.noise_std, self.renormalize = float(noise_std), renormalize
        self.weight = nn.Parameter(torch.empty(width, num_experts))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # the official initialisation

    def forward(self, tokens: Tensor) -> Routing:
        clean = tokens @ self.weight
        std = self.noise_std / self.num_experts if self.training else 0.0
        noisy = clean + torch.randn_like(clean) * std if std > 0 else clean
        probs = torch.softmax(noisy, dim=-1)
        gates, indices = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        counts = torch.zeros(self.num_experts, device=tokens.device).index_add_(
            0, indices.reshape(-1), torch.ones(indices.numel(), device=tokens.device)
        )
        loss = clean.new_zeros(())
        if self.training:
            importance = torch.zeros_like(probs).scatter(-1, indices, gates).sum(0)
            smooth = std > 0 and self.top_k < self.num_experts
            load = self._smooth_load(clean, noisy, std) if smooth else counts
            loss = cv_squared(importance) + cv_squared(load)
        return Routing(indices, gates, loss, counts)

    def _smooth_load(self, clean: Tensor, noisy: Tensor, std: float) -> Tensor:
        """Shazeer et al.'s differentiable load: per token and expert, the probability that the
        expert's noisy logit clears the k-th largest of the others (thresholds from noisy logits)."""
        top = noisy.topk(self.top_k + 1, dim=-1).values
        in_threshold, out_threshold = top[:, self.top_k : self.top_k + 1], top[:, self.top_k - 1 : self.top_k]
        is_in = noisy > in_threshold
        normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
        prob = torch.where(
            is_in, normal.cdf((clean - in_threshold) / std), normal.cdf((clean - out_threshold) / std)
        )
        return prob.sum(0)


class MoEMLP(nn.Module):
    """``num_experts`` two-layer GELU MLPs ``width -> hidden -> width``; each token is served by
    the experts its router chose, weighted by their gate values."""

    def __init__(self, width: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
                for _ in range(num_experts)
            ]
        )
        #: experts removed by static pruning (their modules are gone; tokens routed to them get no
        #: contribution from them, counted in ``pruned_hits``)
        self.pruned: set[int] = set()
        self.pruned_hits = 0

    def forward(self, tokens: Tensor, routing: Routing) -> Tensor:
        out = torch.zeros_like(tokens)
        flat_idx, flat_gate = routing.indices.reshape(-1), routing.gates.reshape(-1)
        owner = torch.arange(tokens.shape[0], device=tokens.device).repeat_interleave(
            routing.indices.shape[1]
        )
        for e in torch.unique(flat_idx).tolist():
            pick = flat_idx == e
            rows = owner[pick]
            if e in self.pruned:
                self.pruned_hits += int(rows.numel())
                continue
            out = out.index_add(
                0, rows, self.experts[e](tokens[rows]) * flat_gate[pick, None].to(tokens.dtype)
            )
        return out

    def dense(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Every expert on every token, mixed with the same (sparse) gates: the reference path."""
        weights = torch.zeros(tokens.shape[0], len(self.experts), dtype=tokens.dtype, device=tokens.device)
        weights = weights.scatter(1, routing.indices, routing.gates.to(tokens.dtype))
        every = torch.stack([expert(tokens) for expert in self.experts], dim=1)  # (N, E, width)
        return (weights[:, :, None] * every).sum(1)

    def prune(self, keep: set[int]) -> None:
        """Delete every expert not in ``keep`` (replaced by an empty module)."""
        for e in range(len(self.experts)):
            if e not in keep:
                self.experts[e] = nn.Identity()
                self.pruned.add(e)
