"""Communication graphs as neighbour lists; every agent is its own neighbour (the paper's k in N_k)."""

from __future__ import annotations

import torch

from mtlkit.errors import ConfigError


def _check(n: int) -> None:
    if not (isinstance(n, int) and n >= 1):
        raise ConfigError(f"A graph needs an integer number of agents >= 1, got {n!r}.")


def complete_graph(n: int) -> list[list[int]]:
    _check(n)
    return [list(range(n)) for _ in range(n)]


def ring_graph(n: int, hops: int = 1) -> list[list[int]]:
    """Each agent talks to the ``hops`` agents on either side."""
    _check(n)
    return [sorted({(k + d) % n for d in range(-hops, hops + 1)}) for k in range(n)]


def random_geometric_graph(
    n: int, radius: float, size: float = 1.0, max_neighbours: int | None = None, seed: int = 0
) -> tuple[list[list[int]], torch.Tensor]:
    """Agents uniform in ``[0, size]^2``, linked within ``radius`` (the paper's sensing range),
    keeping at most ``max_neighbours`` nearest others. Returns neighbour lists and positions."""
    _check(n)
    if not radius > 0:
        raise ConfigError(f"radius must be > 0, got {radius!r}.")
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    dist = torch.cdist(pos, pos)
    out = []
    for k in range(n):
        order = [int(j) for j in dist[k].argsort(stable=True) if j != k and dist[k, j] <= radius]
        if max_neighbours is not None:
            order = order[:max_neighbours]
        out.append(sorted([k, *order]))
    return out, pos
