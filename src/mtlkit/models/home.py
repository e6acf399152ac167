"""HoME: a hierarchy of multi-gate experts with normalised experts, feature gates and self-gates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, TaskError
from mtlkit.models.base import (
    ACTIVATIONS,
    MultiTaskModule,
    MultiTaskOutput,
    last_weight_layer,
    mlp,
    register,
    resolve_out_features,
)
from mtlkit.models.gating import ExpertInputs, shared_cut, softmax_gate_statistics, zero_fraction

TASK_GATE_INPUTS = ("branch", "input")


class NormalisedExpert(nn.Module):
    """An MLP expert whose output layer is ``Linear -> BatchNorm -> Swish`` (HoME's normalised
    expert: every expert's outputs have comparable per-feature statistics and are almost never
    exactly zero), or ``Linear -> ReLU`` with ``normalised=False`` (the MMoE expert)."""

    def __init__(
        self, in_width: int, dims: Sequence[int], activation: str, dropout: float, normalised: bool
    ) -> None:
        super().__init__()
        hidden = mlp(in_width, dims[:-1], activation, dropout)
        width = dims[-2] if len(dims) > 1 else in_width
        out: list[nn.Module] = [nn.Linear(width, dims[-1])]
        if normalised:
            out.append(nn.BatchNorm1d(dims[-1]))
        #: everything up to the output activation (its output is the pre-activation)
        self.body = nn.Sequential(*hidden, *out)
        self.act = nn.SiLU() if normalised else ACTIVATIONS["relu"]()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x))


class FeatureGate(nn.Module):
    """``v -> v * 2 sigmoid(v B A)`` with a rank-``r`` product ``B A`` (HoME's LoRA-style feature
    gate: each expert gets a private view of the input). ``A`` starts at zero, so the gate is
    exactly the identity at initialisation."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, v: Tensor) -> Tensor:
        return v * (2 * torch.sigmoid(self.up(self.down(v))))


class GatedExpert(nn.Module):
    """An expert behind its own feature gate (or none)."""

    def __init__(self, expert: nn.Module, gate: FeatureGate | None) -> None:
        super().__init__()
        self.gate = gate
        self.expert = expert

    def forward(self, v: Tensor) -> Tensor:
        return self.expert(self.gate(v) if self.gate is not None else v)


class Branch(nn.Module):
    """A gate over the experts a branch sees, plus a self-gate over the experts it owns:
    ``out = sum_visible softmax(W u)_i e_i + sum_own s_i e_i`` with ``s = sigmoid(W' u)`` for one
    own expert and ``softmax(W' u)`` for several."""

    def __init__(self, gate_width: int, visible: int, own: int, self_gate: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(gate_width, visible)
        self.self_gate = nn.Linear(gate_width, own) if self_gate and own > 0 else None

    def forward(self, u: Tensor, visible: Tensor, own: Tensor | None) -> tuple[Tensor, Tensor]:
        weights = torch.softmax(self.gate(u), dim=-1)
        out = torch.einsum("be,beh->bh", weights, visible)
        if self.self_gate is not None and own is not None:
            logits = self.self_gate(u)
            s = torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)
            out = out + torch.einsum("be,beh->bh", s, own)
        return out, weights


@register("home")
class HoME(MultiTaskModule):
    """HoME (Wang, Cao, Fu, Gai, Zhou, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task
    Learning at Kuaishou", KDD 2025, arXiv 2408.05430).

    Two expert levels. Meta level (input v): global shared experts S^m and, per task category c,
    category experts C^m_c, each behind its own feature gate. Category branch c sees S^m and C^m_c
    and gives m_c; the global branch sees every meta expert and gives m_s. Task level: shared
    experts S read m_s, category experts C_c read m_c, task experts T_t read m_cat(t); task t's
    branch sees S, C_cat(t) and T_t (the hierarchy mask: never another category's experts) and
    its tower reads the result. Every branch adds a self-gate over the experts it owns.

    The paper's three fixes: normalised experts (``Linear -> BatchNorm -> Swish``) against expert
    collapse; the category hierarchy against shared experts occupied by one task (expert
    degradation); feature gates and self-gates against sparse tasks ignoring their own experts
    (expert underfitting). :meth:`routing_statistics` logs each anomaly:

    - ``experts/<expert>/zeros``: the fraction of exactly-zero outputs of every expert (collapse);
    - ``degradation/<shared expert>/tasks``: how many tasks put at least half of a uniform share
      (``0.5 / visible experts``) of mean gate weight on each task-level shared expert, and
      ``degradation/<shared expert>/top_share`` the largest task's fraction of the total weight
      it receives;
    - ``underfitting/<task>/own``, ``underfitting/<task>/category`` and
      ``underfitting/<task>/shared``: the mean gate mass task t puts on its own, its category's
      and the shared experts.

    No official code exists; this is a reconstruction from the paper's description, named as
    such. Choices where the description leaves room (mtlkit defaults): feature gates sit on the
    meta-level experts, whose input is the feature vector v; the feature gate's up-projection
    starts at zero (identity gate; the unofficial public implementation initialises both factors
    at random, and feeds the gate value instead of ``v * gate`` to the expert, which is not
    done here); task-level gates read the branch input m_cat(t) (``task_gate_input="input"``:
    the raw v); self-gates use a sigmoid for one own expert and a softmax for several.

    Args:
        in_features: input width (the concatenated embeddings v), or the shape of one example.
        tasks: the task set (or task names).
        categories: ``{task: category}``, the prior-knowledge grouping (Kuaishou: passive watching
            versus interaction tasks). ``None``: one category holding every task.
        num_meta_shared, num_meta_category, num_shared, num_category, num_task: experts per set.
        expert_dims: hidden widths of every expert (the last is the expert output width).
        tower_dims, out_features, activation, dropout: as in MMoE.
        feature_gate_rank: rank r of the feature gates (``None``: no feature gates).
        self_gate: whether branches have self-gates.
        normalised_experts: ``False`` gives ReLU experts without BatchNorm (the ablation).
        task_gate_input: ``"branch"`` (m_cat(t)) or ``"input"`` (v).

    What is shared: the meta level, the global branch and the task-level shared experts reach
    every task; a category's branch and experts reach the tasks of that category, so they are
    shared when it holds several tasks (the method combines those tasks' gradients on them) and
    its one task's own otherwise. The representation is one tensor (flattened and concatenated):
    the meta experts' outputs, the task-level shared experts' outputs, and each shared category's
    m_c and expert outputs; everything above it is one task's own.

    Each expert has a BatchNorm, so training needs batches of two or more (``drop_last=True``
    avoids a last batch of one).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        categories: Mapping[str, str] | None = None,
        num_meta_shared: int = 1,
        num_meta_category: int = 1,
        num_shared: int = 1,
        num_category: int = 1,
        num_task: int = 1,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        feature_gate_rank: int | None = 8,
        self_gate: bool = True,
        normalised_experts: bool = True,
        task_gate_input: str = "branch",
    ) -> None:
        super().__init__(tasks)
        if not expert_dims:
            raise TaskError("HoME needs at least one expert layer (expert_dims).")
        counts = (num_meta_shared, num_meta_category, num_shared, num_category, num_task)
        if any(n < 0 for n in counts):
            raise ConfigError(f"HoME: expert counts must be >= 0, got {counts}.")
        if task_gate_input not in TASK_GATE_INPUTS:
            raise ConfigError(f"task_gate_input must be one of {TASK_GATE_INPUTS}, got {task_gate_input!r}.")
        if feature_gate_rank is not None and feature_gate_rank < 1:
            raise ConfigError(f"feature_gate_rank must be >= 1 or None, got {feature_gate_rank}.")
        cats = dict(categories) if categories is not None else dict.fromkeys(self.task_names, "all")
        unknown = set(cats) - set(self.task_names)
        missing = [t for t in self.task_names if t not in cats]
        if unknown or missing:
            raise TaskError(
                f"categories must map every task to a category: unknown {sorted(unknown)}, missing {missing}."
            )
        self.categories = {t: str(cats[t]) for t in self.task_names}
        self.category_names = list(dict.fromkeys(self.categories[t] for t in self.task_names))
        if num_meta_shared + num_meta_category == 0:
            raise ConfigError("HoME needs meta-level experts.")
        if num_shared + num_category + num_task == 0:
            raise ConfigError("HoME needs task-level experts.")
        self.counts = dict(
            zip(("meta_shared", "meta_category", "shared", "category", "task"), counts, strict=True)
        )
        self.in_features = in_features
        self.task_gate_input = task_gate_input
        self.inputs = ExpertInputs(in_features)
        d, h = self.inputs.expert_width, expert_dims[-1]
        C = len(self.category_names)

        def expert(width: int, gated: bool) -> nn.Module:
            body = NormalisedExpert(width, expert_dims, activation, dropout, normalised_experts)
            return GatedExpert(
                body, FeatureGate(width, feature_gate_rank) if gated and feature_gate_rank else None
            )

        self.meta_shared = nn.ModuleList([expert(d, True) for _ in range(num_meta_shared)])
        self.meta_category = nn.ModuleDict(
            {
                c: nn.ModuleList([expert(d, True) for _ in range(num_meta_category)])
                for c in self.category_names
            }
        )
        # the global meta branch feeds only the task-level shared experts
        self.meta_global = (
            Branch(d, num_meta_shared + C * num_meta_category, num_meta_shared, self_gate)
            if num_shared
            else None
        )
        self.meta_branches = nn.ModuleDict(
            {
                c: Branch(d, num_meta_shared + num_meta_category, num_meta_category, self_gate)
                for c in self.category_names
            }
        )
        self.shared = nn.ModuleList([expert(h, False) for _ in range(num_shared)])
        self.category = nn.ModuleDict(
            {c: nn.ModuleList([expert(h, False) for _ in range(num_category)]) for c in self.category_names}
        )
        self.task_experts = nn.ModuleDict(
            {t: nn.ModuleList([expert(h, False) for _ in range(num_task)]) for t in self.task_names}
        )
        gate_width = h if task_gate_input == "branch" else d
        self.task_branches = nn.ModuleDict(
            {
                t: Branch(gate_width, num_shared + num_category + num_task, num_task, self_gate)
                for t in self.task_names
            }
        )
        outs = resolve_out_features(self.task_names, out_features)
        self.towers = nn.ModuleDict(
            {t: mlp(h, tower_dims, activation, dropout, out_features=outs[t]) for t in self.task_names}
        )
        self.last_gates: dict[str, Tensor] = {}
        self._meta_gates: dict[str, Tensor] = {}  # per category
        self._global_gate: Tensor | None = None
        self._last_outputs: dict[str, Tensor] = {}

    # -- the parameter split ------------------------------------------------------------------
    def members(self, category: str) -> list[str]:
        """The tasks of ``category``."""
        return [t for t in self.task_names if self.categories[t] == category]

    def shared_category(self, category: str) -> bool:
        """A category of several tasks is shared: its branch and experts reach each of them."""
        return len(self.members(category)) > 1

    def shared_modules(self) -> Iterable[nn.Module]:
        mods: list[nn.Module] = [self.meta_shared, self.meta_category, self.shared]
        if self.meta_global is not None:
            mods.append(self.meta_global)
        for c in self.category_names:
            if self.shared_category(c):
                mods += [self.meta_branches[c], self.category[c]]
        return mods

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        c = self.categories[task]
        mods = [self.task_experts[task], self.task_branches[task], self.towers[task]]
        if not self.shared_category(c):
            mods += [self.meta_branches[c], self.category[c]]
        return mods

    def last_shared_layers(self) -> list[nn.Module]:
        experts = list(self.shared) or list(self.meta_shared)
        return [last_weight_layer(e) for e in experts]

    def _experts(self, sets: nn.ModuleDict, key: str) -> nn.ModuleList:
        return cast(nn.ModuleList, sets[key])

    # -- forward ------------------------------------------------------------------------------
    def _category(self, c: str, v: Tensor, meta: Tensor) -> tuple[Tensor, Tensor | None]:
        """Category c's meta branch output m_c and its task-level experts' outputs."""
        n_ms, n_mc = self.counts["meta_shared"], self.counts["meta_category"]
        start = n_ms + self.category_names.index(c) * n_mc
        own = meta[:, start : start + n_mc]
        visible = torch.cat([meta[:, :n_ms], own], dim=1)
        m_c, gate = self.meta_branches[c](v, visible, own if n_mc else None)
        self._meta_gates[c] = gate.detach()
        experts = [e(m_c) for e in self._experts(self.category, c)]
        self._last_outputs.update((f"category_{c}{i}", o.detach()) for i, o in enumerate(experts))
        return m_c, (torch.stack(experts, dim=1) if experts else None)

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        self.inputs.check(x, type(self).__name__)
        v, _ = self.inputs(x)
        record = self._last_outputs
        record.clear()
        self.last_gates.clear()
        self._meta_gates.clear()
        self._global_gate = None
        meta_names = [f"meta_shared{i}" for i in range(len(self.meta_shared))]
        meta_outs = [e(v) for e in self.meta_shared]
        for c in self.category_names:
            meta_names += [f"meta_{c}{i}" for i in range(self.counts["meta_category"])]
            meta_outs += [e(v) for e in self._experts(self.meta_category, c)]
        record.update((n, o.detach()) for n, o in zip(meta_names, meta_outs, strict=True))
        meta = torch.stack(meta_outs, dim=1)  # (B, n_meta, h)
        n_ms = self.counts["meta_shared"]
        parts = [meta]
        shared: Tensor | None = None
        if self.meta_global is not None:
            m_s, gate = self.meta_global(v, meta, meta[:, :n_ms] if n_ms else None)
            self._global_gate = gate.detach()
            shared = torch.stack([e(m_s) for e in self.shared], dim=1)
            parts.append(shared)
        # below the representation: everything several tasks read (shared categories included)
        needed = list(dict.fromkeys(self.categories[t] for t in tasks))
        below = [c for c in needed if self.shared_category(c)]
        branch: dict[str, tuple[Tensor, Tensor | None]] = {c: self._category(c, v, meta) for c in below}
        for c in below:
            m_c, experts = branch[c]
            parts += [m_c] + ([experts] if experts is not None else [])
        z, views = shared_cut(parts)
        meta, rest = views[0], views[1:]
        if shared is not None:
            shared, rest = rest[0], rest[1:]
        for c in below:  # the task branches read views of the cut
            experts = branch[c][1]
            branch[c] = (rest[0], rest[1] if experts is not None else None)
            rest = rest[2:] if experts is not None else rest[1:]
        for c in needed:
            if c not in branch:  # a one-task category: above the representation
                branch[c] = self._category(c, v, meta)
        if shared is not None:
            record.update((f"shared{i}", shared[:, i].detach()) for i in range(shared.shape[1]))
        out = {}
        for t in tasks:
            m_c, cat_out = branch[self.categories[t]]
            own_list = [e(m_c) for e in self._experts(self.task_experts, t)]
            record.update((f"{t}{i}", o.detach()) for i, o in enumerate(own_list))
            mine = torch.stack(own_list, dim=1) if own_list else None
            visible = torch.cat([s for s in (shared, cat_out, mine) if s is not None], dim=1)
            u = m_c if self.task_gate_input == "branch" else v
            zt, gate = self.task_branches[t](u, visible, mine)
            self.last_gates[t] = gate.detach()
            out[t] = self.towers[t](zt)
        return MultiTaskOutput(out, z)

    # -- diagnostics ----------------------------------------------------------------------------
    def gate_expert_names(self, task: str) -> list[str]:
        """The experts task ``task``'s gate weights refer to, in order."""
        c = self.categories[task]
        return (
            [f"shared{i}" for i in range(self.counts["shared"])]
            + [f"category_{c}{i}" for i in range(self.counts["category"])]
            + [f"{task}{i}" for i in range(self.counts["task"])]
        )

    def routing_statistics(self) -> dict[str, float]:
        """Gate statistics, and HoME's three anomalies (see the class docstring)."""
        n_ms, n_mc = self.counts["meta_shared"], self.counts["meta_category"]
        meta_shared = [f"meta_shared{i}" for i in range(n_ms)]
        names: dict[str, list[str]] = {}
        gates: dict[str, Tensor] = {}
        for c, g in self._meta_gates.items():
            gates[f"meta/{c}"] = g
            names[f"meta/{c}"] = meta_shared + [f"meta_{c}{i}" for i in range(n_mc)]
        if self._global_gate is not None:  # (a category named "global" shares its log names)
            gates["meta/global"] = self._global_gate
            names["meta/global"] = meta_shared + [
                f"meta_{c}{i}" for c in self.category_names for i in range(n_mc)
            ]
        for t, g in self.last_gates.items():
            gates[f"task/{t}"] = g
            names[f"task/{t}"] = self.gate_expert_names(t)
        stats = softmax_gate_statistics(gates, names)
        stats.update(zero_fraction(self._last_outputs.items()))
        n_s, n_c = self.counts["shared"], self.counts["category"]
        tasks = list(self.last_gates)
        means = {
            t: self.last_gates[t].double().reshape(-1, self.last_gates[t].shape[-1]).mean(0) for t in tasks
        }
        for t in tasks:
            g = means[t]
            stats[f"underfitting/{t}/shared"] = float(g[:n_s].sum())
            stats[f"underfitting/{t}/category"] = float(g[n_s : n_s + n_c].sum())
            stats[f"underfitting/{t}/own"] = float(g[n_s + n_c :].sum())
        if tasks:
            uniform = 0.5 / means[tasks[0]].numel()
            for i in range(n_s):
                shares = torch.stack([means[t][i] for t in tasks])
                stats[f"degradation/shared{i}/tasks"] = float((shares >= uniform).sum())
                stats[f"degradation/shared{i}/top_share"] = float(
                    shares.max() / shares.sum().clamp_min(1e-300)
                )
        return stats
