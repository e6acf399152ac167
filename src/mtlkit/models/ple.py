"""Progressive Layered Extraction (PLE) and its single-level form, Customized Gate Control (CGC)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, TaskError, unknown_name
from mtlkit.models.base import (
    MultiTaskModule,
    MultiTaskOutput,
    last_weight_layer,
    mlp,
    register,
    resolve_out_features,
)
from mtlkit.models.gating import REPRESENTATIONS, ExpertInputs, shared_cut, softmax_gate_statistics


def mix(gate_logits: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_i softmax(logits)_i e_i, the softmax)`` for experts stacked as (B, E, h)."""
    gate = torch.softmax(gate_logits, dim=-1)
    return torch.einsum("be,beh->bh", gate, experts), gate


class ExtractionLevel(nn.Module):
    """One level of PLE: task-specific experts, shared experts, a gate per task over its own and
    the shared experts, and (below the last level) a shared gate over every expert of the level."""

    def __init__(
        self,
        tasks: list[str],
        task_experts: Mapping[str, int],
        num_shared: int,
        in_width: int,
        gate_width: int,
        expert_dims: Sequence[int],
        shared_gate: bool,
        layer: tuple[str, float, bool],
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleDict(
            {
                t: nn.ModuleList([mlp(in_width, expert_dims, *layer) for _ in range(task_experts[t])])
                for t in tasks
            }
        )
        self.shared_experts = nn.ModuleList([mlp(in_width, expert_dims, *layer) for _ in range(num_shared)])
        self.task_gates = nn.ModuleDict(
            {t: nn.Linear(gate_width, task_experts[t] + num_shared) for t in tasks}
        )
        total = sum(task_experts.values()) + num_shared
        self.shared_gate = nn.Linear(gate_width, total) if shared_gate else None

    def experts_of(self, task: str) -> nn.ModuleList:
        return cast(nn.ModuleList, self.task_experts[task])

    def gate_of(self, task: str) -> nn.Linear:
        return cast(nn.Linear, self.task_gates[task])


@register("ple")
class PLE(MultiTaskModule):
    """PLE (Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task
    Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

    Level j has experts of each task, shared experts, one gate per task and, below the last level
    only, a shared gate. Task t's experts and gate read the task's previous output ``in_t``; the
    shared experts and gate read the shared branch's ``in_s`` (level 1: both are the input). Task
    t's gate mixes ``[task-t experts ; shared experts]`` into ``out_t``; the shared gate mixes
    every expert of the level into ``out_s``. Towers read the last level's ``out_t``. This is the
    construction of torch-rechub's PLE (shared gate only when the level is not the last one).

    Args:
        in_features: input width, or the shape of one example.
        tasks: the task set (or task names).
        num_levels: extraction levels L (1 = CGC).
        num_shared_experts: shared experts per level.
        num_task_experts: experts per task per level (an int, or ``{task: n}``; 0 is allowed).
        expert_dims: as in :class:`~mtlkit.models.MMoE`, as are ``tower_dims``, ``out_features``,
            ``activation``, ``dropout``, ``batch_norm``, ``stem_dims`` and ``gate_input`` (the gate
            input applies to level 1; higher levels' gates read the branch's previous output, as in
            the paper).
        representation: ``"per_task"`` (default): each task's last-level mixture, its tower
            input (LibMTL's ``rep_grad`` for PLE); ``"stacked"``: one tensor holding what the
            last level's task branches read from the shared part (each task's ``in_t`` and the
            last level's shared expert outputs; for L = 1 the shared expert outputs, and the stem
            output when there is a stem), which every method accepts.

    Defaults: torch-rechub's Census config uses 2 experts per task and 1 shared expert of width
    [16], towers [8]; mtlkit keeps the expert counts and uses the widths of its MMoE ([64], [32]).

    What is shared: a parameter is task-specific when only that task's loss reaches it, that is
    the last level's task experts and task gate, the task gate of the level below (its output
    feeds only the task's last level), and the tower. Everything else reaches every task through
    the shared gates and is shared, including lower levels' task experts and gates. Hence task
    t's loss has exactly zero gradient on another task's last-level experts, but not on its
    lower-level ones. With ``representation="stacked"`` the task gates of the level below the
    last sit under the one shared tensor and are counted as shared.
    """

    default_levels = 2

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        num_levels: int = 2,
        num_shared_experts: int = 1,
        num_task_experts: int | Mapping[str, int] = 2,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        stem_dims: Sequence[int] = (),
        gate_input: str = "input",
        representation: str = "per_task",
    ) -> None:
        super().__init__(tasks)
        name = type(self).__name__
        if num_levels < 1:
            raise ConfigError(f"{name} needs at least one level, got num_levels={num_levels}.")
        if not expert_dims:
            raise TaskError(f"{name} needs at least one expert layer (expert_dims).")
        if representation not in REPRESENTATIONS:
            raise unknown_name("representation", representation, REPRESENTATIONS)
        per_task = (
            {t: int(num_task_experts.get(t, 0)) for t in self.task_names}
            if isinstance(num_task_experts, Mapping)
            else {t: int(num_task_experts) for t in self.task_names}
        )
        if isinstance(num_task_experts, Mapping):
            unknown = set(num_task_experts) - set(self.task_names)
            if unknown:
                raise TaskError(f"num_task_experts names unknown tasks {sorted(unknown)}.")
        if num_shared_experts < 0 or any(n < 0 for n in per_task.values()):
            raise ConfigError(f"{name}: expert counts must be >= 0.")
        if num_levels > 1 and num_shared_experts == 0 and sum(per_task.values()) == 0:
            raise ConfigError(f"{name} with {num_levels} levels needs experts.")
        if any(per_task[t] + num_shared_experts == 0 for t in self.task_names):
            raise ConfigError(f"{name}: every task's gate needs at least one expert (own or shared).")
        self.num_levels, self.num_shared_experts, self.num_task_experts = (
            num_levels,
            num_shared_experts,
            per_task,
        )
        self.representation = representation
        self.in_features = in_features
        self.inputs = ExpertInputs(in_features, stem_dims, gate_input, activation, dropout, batch_norm)
        width = expert_dims[-1]
        layer = (activation, dropout, batch_norm)
        self.levels = nn.ModuleList(
            [
                ExtractionLevel(
                    self.task_names,
                    per_task,
                    num_shared_experts,
                    self.inputs.expert_width if j == 0 else width,
                    self.inputs.gate_width if j == 0 else width,
                    expert_dims,
                    shared_gate=j < num_levels - 1,
                    layer=layer,
                )
                for j in range(num_levels)
            ]
        )
        outs = resolve_out_features(self.task_names, out_features)
        self.towers = nn.ModuleDict(
            {
                t: mlp(width, tower_dims, activation, dropout, batch_norm, out_features=outs[t])
                for t in self.task_names
            }
        )
        #: the last level's gate weights per task (B, own + shared experts), from the last forward
        self.last_gates: dict[str, Tensor] = {}
        #: per level below the last: the task gates' and the shared gate's weights
        self._lower_gates: list[tuple[dict[str, Tensor], Tensor]] = []

    def level(self, j: int) -> ExtractionLevel:
        return cast(ExtractionLevel, self.levels[j])

    # -- the parameter split ------------------------------------------------------------------
    def task_modules(self, task: str) -> Iterable[nn.Module]:
        last = self.level(-1)
        mods: list[nn.Module] = [last.experts_of(task), last.gate_of(task), self.towers[task]]
        if self.num_levels > 1 and self.representation == "per_task":
            mods.append(self.level(-2).gate_of(task))
        return mods

    def shared_modules(self) -> Iterable[nn.Module]:
        mods: list[nn.Module] = [self.inputs]
        for j in range(self.num_levels):
            level = self.level(j)
            mods.append(level.shared_experts)
            if level.shared_gate is not None:
                mods.append(level.shared_gate)
            if j < self.num_levels - 1:
                mods.append(level.task_experts)
            below = self.num_levels - 1 if self.representation == "stacked" else self.num_levels - 2
            if j < below:
                mods.append(level.task_gates)
        return mods

    def last_shared_layers(self) -> list[nn.Module]:
        return [last_weight_layer(e) for e in self.level(-1).shared_experts] or super().last_shared_layers()

    # -- forward ------------------------------------------------------------------------------
    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        self.inputs.check(x, type(self).__name__)
        self.last_gates.clear()
        self._lower_gates.clear()
        expert_in, gate_in = self.inputs(x)
        task_in = dict.fromkeys(self.task_names, expert_in)
        task_gate_in = dict.fromkeys(self.task_names, gate_in)
        shared_in, shared_gate_in = expert_in, gate_in
        last = self.num_levels - 1
        for j in range(last):
            level = self.level(j)
            own = {t: self._stack(level.experts_of(t), task_in[t]) for t in self.task_names}
            shared = self._stack(level.shared_experts, shared_in)
            # gates whose output no selected task reads are skipped (the level below the last
            # feeds only the tasks' own last level)
            gated = self.task_names if j < last - 1 else tasks
            outs = {}
            task_gates: dict[str, Tensor] = {}
            for t in gated:
                outs[t], gate = mix(level.gate_of(t)(task_gate_in[t]), self._cat(own[t], shared))
                task_gates[t] = gate.detach()
            every = self._cat(*[own[t] for t in self.task_names], shared)
            assert level.shared_gate is not None
            shared_in, gate = mix(level.shared_gate(shared_gate_in), every)
            self._lower_gates.append((task_gates, gate.detach()))
            task_in = task_gate_in = outs
            shared_gate_in = shared_in
        level = self.level(last)
        shared = self._stack(level.shared_experts, shared_in)
        z: Tensor | None = None
        if self.representation == "stacked":
            z, task_in, task_gate_in, shared = self._stacked(tasks, task_in, task_gate_in, shared)
        mixed = {}
        for t in tasks:
            mine = self._stack(level.experts_of(t), task_in[t])
            mixed[t], gate = mix(level.gate_of(t)(task_gate_in[t]), self._cat(mine, shared))
            self.last_gates[t] = gate.detach()
        rep: Tensor | dict[str, Tensor] | None = dict(mixed) if self.representation == "per_task" else z
        return MultiTaskOutput({t: self.towers[t](mixed[t]) for t in tasks}, rep)

    def _stacked(
        self,
        tasks: list[str],
        task_in: dict[str, Tensor],
        gate_in: dict[str, Tensor],
        shared: Tensor | None,
    ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor], Tensor | None]:
        """One tensor holding what the last level's task branches read from the shared part, and
        the views of it they read instead: each task's input and the shared experts' outputs (for
        one level: the stem's output, when there is a stem, and the shared experts' outputs)."""
        parts: list[Tensor] = []
        if self.num_levels > 1:
            parts.append(torch.stack([task_in[t] for t in tasks], dim=1))
        elif self.inputs.stem is not None:
            parts.append(task_in[tasks[0]])
        if shared is not None:
            parts.append(shared)
        if not parts:
            return None, task_in, gate_in, shared
        z, views = shared_cut(parts)
        if self.num_levels > 1:
            task_in = gate_in = {t: views[0][:, i] for i, t in enumerate(tasks)}
        elif self.inputs.stem is not None:
            task_in = dict.fromkeys(tasks, views[0])
            if self.inputs.gate_reads_shared:
                gate_in = task_in
        return z, task_in, gate_in, (views[-1] if shared is not None else None)

    @staticmethod
    def _stack(experts: nn.ModuleList, inp: Tensor) -> Tensor | None:
        return torch.stack([e(inp) for e in experts], dim=1) if len(experts) else None

    @staticmethod
    def _cat(*stacks: Tensor | None) -> Tensor:
        return torch.cat([s for s in stacks if s is not None], dim=1)

    def routing_statistics(self) -> dict[str, float]:
        """Gate statistics per task gate (``gate/<task>/...``; with several levels
        ``gate/level<j>/<task>/...`` and ``gate/level<j>/shared/...`` for the shared gates)."""
        shared = [f"shared{i}" for i in range(self.num_shared_experts)]

        def own(task: str) -> list[str]:
            return [f"{task}{i}" for i in range(self.num_task_experts[task])] + shared

        every = [f"{t}{i}" for t in self.task_names for i in range(self.num_task_experts[t])] + shared
        stats: dict[str, float] = {}
        for j, (task_gates, shared_gate) in enumerate(self._lower_gates):
            stats.update(
                softmax_gate_statistics(
                    {f"level{j + 1}/{t}": g for t, g in task_gates.items()},
                    {f"level{j + 1}/{t}": own(t) for t in task_gates},
                )
            )
            stats.update(
                softmax_gate_statistics(
                    {f"level{j + 1}/shared": shared_gate}, {f"level{j + 1}/shared": every}
                )
            )
        prefix = f"level{self.num_levels}/" if self.num_levels > 1 else ""
        stats.update(
            softmax_gate_statistics(
                {f"{prefix}{t}": g for t, g in self.last_gates.items()},
                {f"{prefix}{t}": own(t) for t in self.last_gates},
            )
        )
        return stats


@register("cgc")
class CGC(PLE):
    """CGC, Customized Gate Control (Tang et al., RecSys 2020): PLE with one extraction level.

    Each task's gate mixes its own experts and the shared experts; a task's gate never sees
    another task's experts, so task t's loss has exactly zero gradient on them. With no task
    experts CGC is MMoE over the shared experts; with no shared experts it is T separate
    mixture models on a common input. Arguments as :class:`PLE` without ``num_levels``.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        num_shared_experts: int = 1,
        num_task_experts: int | Mapping[str, int] = 2,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        stem_dims: Sequence[int] = (),
        gate_input: str = "input",
        representation: str = "per_task",
    ) -> None:
        super().__init__(
            in_features,
            tasks,
            1,
            num_shared_experts,
            num_task_experts,
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
