"""Graphs for multi-task self-supervised pretraining (ParetoGNN: Ju, Zhao, Wen, Yu, Shah, Ye, Zhang,
"Multi-task Self-supervised Graph Neural Networks Enable Stronger Task Generalization", ICLR 2023),
in plain PyTorch: no graph library.

- :func:`sbm_graph`: a stochastic block model whose node features carry the block as a noisy
  signal (the spec's synthetic setting);
- :func:`karate_club`: Zachary's karate club (34 members, the 1977 split of the club as labels),
  the one real labelled graph that ships offline here (inside ``networkx``, a dependency of
  torch); no citation graph ships in a registry package, so Cora/PubMed are not offered;
- :class:`PretextLoader`: per step, the pretext tasks' inputs and targets: link prediction
  (held-in edges against uniformly sampled non-edges), masked-feature reconstruction, and
  node-graph mutual information (DGI: real against feature-shuffled nodes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlkit.core.tasks import Batch, Task, TaskSet
from mtlkit.errors import ConfigError, DatasetNotAvailableError


@dataclass
class Graph:
    """An undirected graph: node features (N, F), edges (2, E) with ``i < j`` once each, node
    labels (N,) for probing."""

    features: Tensor
    edges: Tensor
    labels: Tensor
    name: str = "graph"

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.edges.dim() != 2 or self.edges.shape[0] != 2:
            raise ConfigError(f"edges must be (2, E), got {tuple(self.edges.shape)}.")
        if self.edges.numel() and (int(self.edges.min()) < 0 or int(self.edges.max()) >= n):
            raise ConfigError(f"An edge names a node outside 0..{n - 1}.")
        if self.labels.shape != (n,):
            raise ConfigError(f"labels must be ({n},), got {tuple(self.labels.shape)}.")

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])


def normalized_adjacency(edges: Tensor, num_nodes: int) -> Tensor:
    """The GCN propagation matrix ``D^-1/2 (A + I) D^-1/2`` (Kipf & Welling, ICLR 2017) as a sparse
    (N, N) tensor, from undirected edges listed once."""
    loops = torch.arange(num_nodes)
    rows = torch.cat([edges[0], edges[1], loops])
    cols = torch.cat([edges[1], edges[0], loops])
    degree = torch.zeros(num_nodes).index_add_(0, rows, torch.ones(len(rows)))
    values = degree[rows].rsqrt() * degree[cols].rsqrt()
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, (num_nodes, num_nodes), check_invariants=False
    ).coalesce()


def sbm_graph(
    block_sizes: Sequence[int] = (150, 150, 150, 150),
    p_in: float = 0.05,
    p_out: float = 0.005,
    feature_dim: int = 32,
    feature_signal: float = 0.5,
    seed: int = 0,
) -> Graph:
    """A stochastic block model: an edge within a block with probability ``p_in``, across blocks
    with ``p_out``; node features are the block's random mean direction times ``feature_signal``
    plus standard normal noise, so both the structure and the features carry the block (the
    label)."""
    if not (0 <= p_out <= 1 and 0 <= p_in <= 1) or len(block_sizes) < 2:
        raise ConfigError("sbm_graph needs probabilities in [0, 1] and at least two blocks.")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(block_sizes)])
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    prob = torch.where(same, p_in, p_out)
    upper = torch.triu(torch.rand(n, n, generator=gen) < prob, diagonal=1)
    edges = upper.nonzero().T.contiguous()
    means = torch.randn(len(block_sizes), feature_dim, generator=gen)
    means = means / means.norm(dim=1, keepdim=True) * feature_signal * feature_dim**0.5
    features = means[labels] + torch.randn(n, feature_dim, generator=gen)
    return Graph(features, edges, labels, name=f"sbm{len(block_sizes)}x{block_sizes[0]}")


def karate_club() -> Graph:
    """Zachary's karate club (Zachary, J. Anthropol. Res. 1977) from ``networkx``: 34 members, 78
    friendships, labels = the faction each member joined; one-hot node features."""
    try:
        import networkx as nx
    except ImportError as exc:  # a dependency of torch, so normally present
        raise DatasetNotAvailableError(
            "The karate club graph comes from networkx: pip install networkx"
        ) from exc
    g = nx.karate_club_graph()
    edges = torch.tensor(sorted((min(a, b), max(a, b)) for a, b in g.edges()), dtype=torch.long).T
    labels = torch.tensor([0 if g.nodes[i]["club"] == "Mr. Hi" else 1 for i in range(g.number_of_nodes())])
    return Graph(torch.eye(g.number_of_nodes()), edges.contiguous(), labels, name="karate_club")


def split_edges(graph: Graph, test_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Held-in and held-out edges (the held-out ones evaluate link prediction)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(graph.edges.shape[1], generator=gen)
    cut = round(graph.edges.shape[1] * test_fraction)
    return graph.edges[:, order[cut:]], graph.edges[:, order[:cut]]


def edge_set(edges: Tensor) -> set[tuple[int, int]]:
    """Both orientations of every edge, for membership tests."""
    pairs = edges.T.tolist()
    return {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}


def sample_non_edges(
    known: set[tuple[int, int]], num_nodes: int, count: int, generator: torch.Generator
) -> Tensor:
    """``count`` uniformly drawn node pairs ``i != j`` that are not in ``known`` (2, count)."""
    out: list[tuple[int, int]] = []
    while len(out) < count:
        pairs = torch.randint(0, num_nodes, (2 * (count - len(out)) + 8, 2), generator=generator).tolist()
        out += [(a, b) for a, b in pairs if a != b and (a, b) not in known][: count - len(out)]
    return torch.tensor(out, dtype=torch.long).T


PRETEXT_TASKS = ("link", "recon", "ming")


def pretext_tasks(names: Sequence[str] = PRETEXT_TASKS) -> TaskSet:
    """Link prediction (BCE on pair scores), masked-feature reconstruction (MSE) and node-graph
    mutual information (BCE of a real-vs-corrupted discriminator)."""
    unknown = [n for n in names if n not in PRETEXT_TASKS]
    if unknown or not names:
        raise ConfigError(f"Pretext tasks are {list(PRETEXT_TASKS)}; got {list(names)}.")
    losses = {"link": "bce", "recon": "mse", "ming": "bce"}
    return TaskSet([Task(n, loss=losses[n]) for n in names])


class PretextLoader:
    """One full-graph step per item: the pretext tasks' inputs and targets.

    Inputs: ``features`` (masked nodes' features replaced by zeros), ``clean`` (the features),
    ``adj`` (the normalised adjacency of the held-in edges), ``pairs`` (``edges_per_step``
    held-in edges then as many sampled non-edges), ``masked`` (the indices of the masked nodes),
    ``shuffle`` (a node permutation that corrupts the features for ``ming``). Targets: ``link``
    (1 for the edges, 0 for the non-edges), ``recon`` (the masked nodes' original features),
    ``ming`` (1 for the N real nodes, 0 for the N corrupted ones).
    ``generator`` is seeded by the Trainer per epoch.
    """

    def __init__(
        self,
        graph: Graph,
        edges: Tensor,
        tasks: Sequence[str] = PRETEXT_TASKS,
        steps_per_epoch: int = 20,
        edges_per_step: int = 256,
        mask_rate: float = 0.3,
        seed: int = 0,
    ) -> None:
        if not 0 < mask_rate < 1:
            raise ConfigError(f"mask_rate must lie in (0, 1), got {mask_rate}.")
        self.graph, self.edges = graph, edges
        self.tasks = pretext_tasks(tasks)
        self.steps_per_epoch = steps_per_epoch
        self.edges_per_step = min(edges_per_step, edges.shape[1])
        self.mask_rate = mask_rate
        self.adj = normalized_adjacency(edges, graph.num_nodes)
        self.known = edge_set(graph.edges)  # no edge of the graph, held out or not, is a negative
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        n = self.graph.num_nodes
        for _ in range(self.steps_per_epoch):
            pick = torch.randperm(self.edges.shape[1], generator=self.generator)[: self.edges_per_step]
            positive = self.edges[:, pick]
            negative = sample_non_edges(self.known, n, positive.shape[1], self.generator)
            pairs = torch.cat([positive, negative], dim=1).T
            link = torch.cat([torch.ones(positive.shape[1]), torch.zeros(negative.shape[1])])
            masked = torch.randperm(n, generator=self.generator)[: max(1, int(n * self.mask_rate))]
            features = self.graph.features.clone()
            features[masked] = 0.0
            shuffle = torch.randperm(n, generator=self.generator)
            inputs = {
                "features": features,
                "clean": self.graph.features,
                "adj": self.adj,
                "pairs": pairs,
                "masked": masked,
                "shuffle": shuffle,
            }
            ming = torch.cat([torch.ones(n), torch.zeros(n)])
            targets = {"link": link, "recon": self.graph.features[masked], "ming": ming}
            yield Batch(inputs, {t: targets[t] for t in self.tasks.names})
