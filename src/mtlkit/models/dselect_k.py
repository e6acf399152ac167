"""DSelect-k: MMoE with differentiable, exactly k-sparse gates."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, unknown_name
from mtlkit.models.base import register
from mtlkit.models.mmoe import MMoE

GATE_MODES = ("per_example", "static")


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """0 for ``t <= -gamma/2``, 1 for ``t >= gamma/2``, the cubic ``-2 t^3/gamma^3 + 3t/(2 gamma)
    + 1/2`` in between (continuously differentiable; Hazimeh et al. 2020)."""
    cubic = -2.0 * t**3 / gamma**3 + 1.5 * t / gamma + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic)
    )


class DSelectGate(nn.Module):
    """One task's DSelect-k gate over ``num_experts`` experts.

    ``k`` single-expert selectors each turn ``m = ceil(log2 E)`` logits into a distribution over
    the experts, ``r_j[i] = prod_b S(z_jb)`` or ``1 - S(z_jb)`` as bit b of i's binary code is 1 or
    0 (S the smooth step); the expert weights are ``q = sum_j softmax(w)_j r_j``. Once every
    ``S(z_jb)`` is 0 or 1 each selector is one-hot, so at most k weights are non-zero.

    ``width=None``: static (task-only) gate, the logits are parameters; else per-example, the
    logits are linear in the gate input. Initialisation as the official Keras layer: z (and the
    per-example layer's weights and bias) uniform in (-gamma/100, gamma/100), w in (-0.05, 0.05).
    """

    def __init__(self, num_experts: int, k: int, gamma: float, width: int | None) -> None:
        super().__init__()
        self.num_experts, self.k, self.gamma = num_experts, k, gamma
        self.bits = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
        codes = [[bool((i >> (self.bits - 1 - b)) & 1) for b in range(self.bits)] for i in range(num_experts)]
        self.register_buffer(
            "codes", torch.tensor(codes, dtype=torch.bool).reshape(num_experts, self.bits), persistent=False
        )
        self.z: nn.Module | nn.Parameter
        self.w: nn.Module | nn.Parameter
        z_bound = gamma / 100
        if width is None:
            self.z = nn.Parameter(torch.empty(k, self.bits).uniform_(-z_bound, z_bound))
            self.w = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
        else:
            self.z = nn.Linear(width, k * self.bits)
            self.w = nn.Linear(width, k)
            for layer, bound in ((self.z, z_bound), (self.w, 0.05)):
                nn.init.uniform_(layer.weight, -bound, bound)
                nn.init.uniform_(layer.bias, -bound, bound)

    @property
    def static(self) -> bool:
        return isinstance(self.z, nn.Parameter)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(expert weights, selector outputs)``: (E,) and (k, E) for a static gate, (B, E) and
        (B, k, E) per example."""
        z: Tensor
        w: Tensor
        if isinstance(self.z, nn.Parameter) and isinstance(self.w, nn.Parameter):
            z, w = self.z, self.w
        else:
            z = cast(nn.Linear, self.z)(u).view(u.shape[0], self.k, self.bits)
            w = cast(nn.Linear, self.w)(u)
        s = smooth_step(z, self.gamma).unsqueeze(-2)  # (..., k, 1, m)
        codes = cast(Tensor, self.codes)
        selectors = torch.where(codes, s, 1 - s).prod(-1)  # (..., k, E)
        weights = (torch.softmax(w, dim=-1).unsqueeze(-1) * selectors).sum(-2)
        return weights, selectors


@register("dselect_k")
class DSelectK(MMoE):
    """DSelect-k (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong, Chi, "DSelect-k:
    Differentiable Selection in the Mixture of Experts with Applications to Multi-Task Learning",
    NeurIPS 2021): MMoE whose softmax gates are replaced by :class:`DSelectGate` (at most ``k``
    experts per task once the smooth steps saturate).

    Args (beyond :class:`~mtlkit.models.MMoE`'s):
        k: the number of experts each task may select (``num_nonzeros``; no official default).
        gamma: width of the smooth step's cubic region (official default 1.0).
        gate_mode: ``"per_example"`` (logits from the gate input) or ``"static"`` (task-only
            conditioning: one weight vector per task).
        entropy_reg: weight of the selectors' entropy penalty ``-sum r log(r + 1e-6)``, which
            speeds up their convergence to one-hot (``None``: off, the official default).

    Auxiliary losses (in ``model(x, full_output=True).aux_losses``, added to the update by the
    method rather than back-propagated in ``forward``), in training mode only, as the official
    layer adds them: ``dselect_entropy/<task>`` when ``entropy_reg`` is set, and, when E is not a
    power of two, ``dselect_reachable/<task>`` = ``sum 1 / sum_i r_j[i]`` over selectors (and
    examples), which keeps the selectors' mass off the binary codes that name no expert.

    Departures from the official code: none in the gate; LibMTL's version hard-codes the entropy
    weight 1e-6 and calls ``backward()`` on it inside ``forward``, which this class does not.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        num_experts: int = 8,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        stem_dims: Sequence[int] = (),
        gate_input: str = "input",
        representation: str = "stacked",
        k: int = 2,
        gamma: float = 1.0,
        gate_mode: str = "per_example",
        entropy_reg: float | None = None,
    ) -> None:
        if gate_mode not in GATE_MODES:
            raise unknown_name("gate_mode", gate_mode, GATE_MODES)
        if k < 1:
            raise ConfigError(f"DSelect-k needs k >= 1, got k={k}.")
        if not gamma > 0:
            raise ConfigError(f"DSelect-k needs gamma > 0, got gamma={gamma}.")
        if entropy_reg is not None and not entropy_reg >= 0:
            raise ConfigError(f"entropy_reg must be >= 0 or None, got {entropy_reg}.")
        self.k, self.gamma, self.gate_mode, self.entropy_reg = k, gamma, gate_mode, entropy_reg
        super().__init__(
            in_features,
            tasks,
            num_experts,
            expert_dims,
            tower_dims,
            out_features,
            activation,
            dropout,
            batch_norm,
            stem_dims,
            gate_input,
            representation,
        )
        self.power_of_two = num_experts == 2 ** self.gates[self.task_names[0]].bits  # type: ignore[operator]

    def _make_gates(self, gate_width: int) -> nn.ModuleDict:
        width = None if self.gate_mode == "static" else gate_width
        return nn.ModuleDict(
            {t: DSelectGate(self.num_experts, self.k, self.gamma, width) for t in self.task_names}
        )

    def _gate(self, task: str, gate_in: Tensor, aux: dict[str, Tensor]) -> Tensor:
        weights, selectors = self.gates[task](gate_in)
        if self.training:
            if self.entropy_reg is not None:
                entropy = -(selectors * torch.log(selectors + 1e-6)).sum()
                aux[f"dselect_entropy/{task}"] = self.entropy_reg * entropy
            if not self.power_of_two:
                aux[f"dselect_reachable/{task}"] = (1.0 / selectors.sum(-1).clamp_min(1e-12)).sum()
        return weights
