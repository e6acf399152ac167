"""A plain-PyTorch graph convolutional encoder with pretext-task heads (ParetoGNN's set-up)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ShapeMismatchError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput


class GCN(nn.Module):
    """Graph convolutions ``H' = act(A_hat H W)`` (Kipf & Welling, ICLR 2017) with PReLU between
    layers, as ParetoGNN's encoder (``A_hat`` sparse, from
    :func:`~mtlkit.data.graphs.normalized_adjacency`)."""

    def __init__(self, in_features: int, dims: Sequence[int] = (512, 256)) -> None:
        super().__init__()
        widths = [in_features, *dims]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in pairwise(widths)])
        self.acts = nn.ModuleList([nn.PReLU() for _ in dims[:-1]])

    def forward(self, features: Tensor, adj: Tensor) -> Tensor:
        h = features
        for i, layer in enumerate(self.layers):
            h = torch.sparse.mm(adj, layer(h)) if adj.is_sparse else adj @ layer(h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h


class GraphPretext(MultiTaskModule):
    """A GCN encoder shared by self-supervised pretext tasks, each with its own head:

    - ``link``: a projection MLP, then the dot product of the two nodes' projections (a logit);
    - ``recon``: a decoder MLP from the embeddings of the masked nodes back to their features;
    - ``ming``: Deep Graph Infomax (Veličković et al., ICLR 2019): a bilinear discriminator scores
      each node's embedding of the clean graph (real) and of the graph with its node features
      shuffled (corrupted) against the clean graph's summary ``sigmoid(mean(h))``.

    Inputs are :class:`~mtlkit.data.graphs.PretextLoader` batches. The representation is the
    node embedding matrix (every task reads it), so representation-level methods apply too,
    except with ``ming``, whose corrupted pass reaches the encoder outside it (the
    representation is then ``None`` and representation-level methods refuse the model).
    Reconstruction and link prediction read the masked-feature pass, ``ming`` the clean one.
    :meth:`embed` gives the frozen embeddings for probing.
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        encoder_dims: Sequence[int] = (512, 256),
        head_dim: int = 512,
    ) -> None:
        super().__init__(tasks)
        self.in_features = in_features
        self.encoder = GCN(in_features, encoder_dims)
        width = encoder_dims[-1]
        heads: dict[str, nn.Module] = {}
        for t in self.task_names:
            if t == "ming":
                heads[t] = nn.Bilinear(width, width, 1)
                continue
            out = width if t == "link" else in_features
            heads[t] = nn.Sequential(nn.Linear(width, head_dim), nn.PReLU(), nn.Linear(head_dim, out))
        self.heads = nn.ModuleDict(heads)

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.encoder]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.heads[task]]

    def embed(self, features: Tensor, adj: Tensor) -> Tensor:
        return self.encoder(features, adj)

    def forward_tasks(self, x: Any, tasks: list[str]) -> MultiTaskOutput:
        if not isinstance(x, Mapping) or "features" not in x or "adj" not in x:
            raise ShapeMismatchError(
                "GraphPretext takes PretextLoader inputs {'features', 'adj', 'pairs', 'masked'}."
            )
        h = self.embed(x["features"], x["adj"])
        out: dict[str, Tensor] = {}
        for t in tasks:
            if t == "link":
                z = self.heads[t](h)
                pairs = x["pairs"]
                out[t] = (z[pairs[:, 0]] * z[pairs[:, 1]]).sum(dim=-1)
            elif t == "recon":
                out[t] = self.heads[t](h[x["masked"]])
            elif t == "ming":
                clean = self.embed(x["clean"], x["adj"])
                corrupt = self.embed(x["clean"][x["shuffle"]], x["adj"])
                summary = torch.sigmoid(clean.mean(dim=0)).expand_as(clean)
                both = torch.cat([clean, corrupt])
                out[t] = self.heads[t](both, torch.cat([summary, summary])).squeeze(-1)
            else:
                raise ShapeMismatchError(f"GraphPretext has no pretext task {t!r}.")
        return MultiTaskOutput(out, None if "ming" in tasks else h)
