"""Task-vector diagnostics before merging: per-tensor norms, pairwise cosines and sign-conflict
rates, as a table and heat maps (read one tensor at a time, like a per-tensor merge)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtlkit.core.figures import pyplot, save_figure
from mtlkit.errors import ConfigError
from mtlkit.merging.base import COMPUTE_DTYPE
from mtlkit.merging.merge import _check_compatible
from mtlkit.merging.sources import is_mergeable, open_source


@dataclass
class TaskVectorDiagnostics:
    """Per merged tensor: each task vector's L2 norm, the pairwise cosines, and the sign-conflict
    rate (the fraction of coordinates, among those some task moves, where tasks move in opposite
    directions). ``cosine`` and ``conflict`` also hold the whole-model values."""

    tasks: list[str]
    tensors: list[str] = field(default_factory=list)
    norms: list[list[float]] = field(default_factory=list)  # [tensor][task]
    cosines: list[dict[tuple[str, str], float]] = field(default_factory=list)
    conflicts: list[float] = field(default_factory=list)
    cosine: dict[tuple[str, str], float] = field(default_factory=dict)
    conflict: float = 0.0

    def table(self) -> str:
        """A Markdown table: one row per tensor, then the whole model."""
        pairs = list(itertools.combinations(self.tasks, 2))
        head = [
            "tensor",
            *(f"norm {t}" for t in self.tasks),
            *(f"cos {a}~{b}" for a, b in pairs),
            "sign conflict",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, name in enumerate(self.tensors):
            cells = [
                name,
                *(f"{n:.4g}" for n in self.norms[i]),
                *(f"{self.cosines[i][p]:+.3f}" for p in pairs),
                f"{self.conflicts[i]:.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        total = [f"{sum(r[j] ** 2 for r in self.norms) ** 0.5:.4g}" for j in range(len(self.tasks))]
        lines.append(
            "| **model** | "
            + " | ".join([*total, *(f"{self.cosine[p]:+.3f}" for p in pairs), f"{self.conflict:.3f}"])
            + " |"
        )
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Two heat maps: the whole-model cosine matrix, and the norms per tensor and task."""
        plt = pyplot()
        k = len(self.tasks)
        matrix = torch.eye(k, dtype=torch.float64)
        for (a, b), c in self.cosine.items():
            i, j = self.tasks.index(a), self.tasks.index(b)
            matrix[i, j] = matrix[j, i] = c
        fig, axes = plt.subplots(1, 2, figsize=(6 + 0.4 * k, max(3.0, 0.25 * len(self.tensors) + 1.5)))
        im = axes[0].imshow(matrix.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        axes[0].set_xticks(range(k), self.tasks, rotation=90)
        axes[0].set_yticks(range(k), self.tasks)
        axes[0].set_title("task-vector cosine")
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        im = axes[1].imshow(torch.tensor(self.norms).numpy(), aspect="auto", cmap="viridis")
        axes[1].set_xticks(range(k), self.tasks, rotation=90)
        axes[1].set_yticks(range(len(self.tensors)), self.tensors, fontsize=6)
        axes[1].set_title("norm per tensor")
        fig.colorbar(im, ax=axes[1], fraction=0.046)
        return save_figure(fig, path, dpi=120)


def diagnose(pretrained: Any, experts: Mapping[str, Any]) -> TaskVectorDiagnostics:
    """Diagnostics of the task vectors ``expert - pretrained`` (same inputs as ``merge``)."""
    if len(experts) < 1:
        raise ConfigError("diagnose needs at least one expert.")
    sources = [open_source(obj, f"expert {name!r}") for name, obj in experts.items()]
    base = open_source(pretrained, "the pretrained model")
    names = base.keys()
    _check_compatible(names, base, sources)
    aliases = base.aliases()
    tasks = list(experts)
    out = TaskVectorDiagnostics(tasks)
    dots: dict[tuple[str, str], float] = dict.fromkeys(itertools.combinations(tasks, 2), 0.0)
    squares = [0.0] * len(tasks)
    moved = conflicted = 0
    for name in names:
        if name in aliases or not is_mergeable(base.dtype(name)):
            continue
        ref = base.load(name).to(COMPUTE_DTYPE)
        taus = torch.stack([s.load(name).to(COMPUTE_DTYPE) - ref for s in sources]).reshape(len(tasks), -1)
        norms = taus.norm(dim=1)
        gram = taus @ taus.T
        cos = {}
        for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2):
            denom = float(norms[i] * norms[j])
            cos[(a, b)] = float(gram[i, j]) / denom if denom > 0 else 0.0
            dots[(a, b)] += float(gram[i, j])
        for i in range(len(tasks)):
            squares[i] += float(gram[i, i])
        nonzero = (taus != 0).any(0)
        opposed = (taus > 0).any(0) & (taus < 0).any(0)
        moved += int(nonzero.sum())
        conflicted += int(opposed.sum())
        out.tensors.append(name)
        out.norms.append(norms.tolist())
        out.cosines.append(cos)
        out.conflicts.append(float(opposed.sum()) / max(1, int(nonzero.sum())))
    out.cosine = {
        (a, b): (dots[(a, b)] / (squares[tasks.index(a)] * squares[tasks.index(b)]) ** 0.5)
        if squares[tasks.index(a)] * squares[tasks.index(b)] > 0
        else 0.0
        for a, b in dots
    }
    out.conflict = conflicted / max(1, moved)
    return out
