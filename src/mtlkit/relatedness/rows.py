"""How relatedness matrices enter a Trainer's epoch row (and so ``epochs.csv``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def directed_entries(prefix: str, names: Sequence[str], matrix: Tensor) -> dict[str, float]:
    """``{f"{prefix}/{source}->{target}": matrix[source, target]}`` for every ordered pair."""
    return {
        f"{prefix}/{src}->{dst}": float(matrix[i, j])
        for i, src in enumerate(names)
        for j, dst in enumerate(names)
    }
