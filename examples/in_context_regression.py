"""In-context multi-task linear regression with multi-head softmax attention: heads and tasks.

After He, Pan, Chen, Yang, "In-Context Linear Regression Demystified: Training Dynamics and
Mechanistic Interpretability of Multi-Head Softmax Attention", 2025. A one-layer multi-head softmax
attention model reads a prompt of ``L`` examples ``(x_l, y_l)`` and a query ``x_q`` and predicts
``y_q``. Trained on fresh prompts, each head learns a key-query matrix whose x-block is diagonal
(``+/- omega``) and an output-value map that reads only the labels (``+/- mu``); a pair of heads
with opposite signs implements a debiased gradient-descent predictor, which one head cannot.

With ``T`` regression tasks in one prompt (here two, on overlapping coordinate blocks of one ``x``:
task 1 reads ``x[0:3]``, task 2 ``x[1:4]``, each its own label), the number of heads decides how the
tasks share them:

- ``H >= 2T``: the heads split up between the tasks, each head's key-query mass on one task's own
  coordinates (in the paper's long runs, a +/- pair per task whose readouts also separate; after
  this example's 3,000 steps the readouts still write both labels);
- ``H < 2T``: superposition: a head serves both tasks at once (mass on both blocks, output to both
  labels), and the loss is higher than with enough heads, lower than with one.

A toy reconstruction at CPU scale (``d = 4``, ``L = 24``, a few thousand steps) of the paper's
multi-task experiment (its code: ``d = 6``, ``L = 48``, 500,001 steps).

    python examples/in_context_regression.py --out runs/in_context_regression.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mtlkit.core.figures import pyplot, save_figure

D, L = 4, 24
BLOCKS = ((0, 1, 2), (1, 2, 3))  # the coordinates each task reads
ONLY = ((0,), (3,))  # the coordinates only that task reads
T = len(BLOCKS)
E = D + T


def prompts(batch: int, generator: torch.Generator, noise: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Context tokens ``(batch, L, E)`` = ``(x_l, y_l1, y_l2)``, query tokens ``(batch, E)`` =
    ``(x_q, 0, 0)`` and the query's targets ``(batch, T)``."""
    x = torch.randn(batch, L + 1, D, generator=generator)
    ys = []
    for block in BLOCKS:
        beta = torch.randn(batch, len(block), generator=generator) / math.sqrt(len(block))
        ys.append((x[:, :, list(block)] * beta[:, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1)  # (batch, L + 1, T)
    context = torch.cat([x[:, :L], y[:, :L] + noise * torch.randn(batch, L, T, generator=generator)], dim=-1)
    query = torch.cat([x[:, L], torch.zeros(batch, T)], dim=-1)
    return context, query, y[:, L]


class MultiHeadAttention(nn.Module):
    """One layer of H softmax heads with full query, key and value maps per head and a shared output
    map; the query token attends to the context tokens only."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Parameter(torch.empty(heads, E, E))
        self.k = nn.Parameter(torch.empty(heads, E, E))
        self.v = nn.Parameter(torch.empty(heads, E, E))
        self.o = nn.Parameter(torch.empty(T, heads * E))
        for p in (self.q, self.k, self.v):
            nn.init.uniform_(p, -1 / math.sqrt(E), 1 / math.sqrt(E))
        nn.init.uniform_(self.o, -1 / math.sqrt(heads * E), 1 / math.sqrt(heads * E))

    def forward(self, context: Tensor, query: Tensor) -> Tensor:
        q = torch.einsum("hij,bj->bhi", self.q, query)
        k = torch.einsum("hij,blj->bhli", self.k, context)
        v = torch.einsum("hij,blj->bhli", self.v, context)
        attention = torch.softmax(torch.einsum("bhli,bhi->bhl", k, q) / math.sqrt(E), dim=-1)
        mixed = torch.einsum("bhl,bhli->bhi", attention, v).reshape(len(query), -1)
        return mixed @ self.o.T

    def key_query(self) -> Tensor:
        """``(H, E, E)``: each head's ``W_K^T W_Q / sqrt(E)`` (rows: key features, columns: query)."""
        return torch.einsum("hki,hkj->hij", self.k, self.q) / math.sqrt(E)

    def output_value(self) -> Tensor:
        """``(H, T, E)``: each head's map from a value token's features to the outputs."""
        return torch.einsum("thi,hij->htj", self.o.reshape(T, self.heads, E), self.v)


def train(
    heads: int, steps: int = 3000, seed: int = 0, lr: float = 3e-3, batch: int = 256
) -> MultiHeadAttention:
    torch.manual_seed(seed)
    model = MultiHeadAttention(heads)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        context, query, target = prompts(batch, gen)
        loss = ((model(context, query) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def held_out_loss(model: MultiHeadAttention, n: int = 8192) -> float:
    with torch.no_grad():
        context, query, target = prompts(n, torch.Generator().manual_seed(999))
        return float(((model(context, query) - target) ** 2).mean())


def head_allocation(model: MultiHeadAttention) -> dict[str, np.ndarray]:
    """Per head and task: the mean |diagonal| of the key-query x-block over the coordinates only that
    task reads (``mass``), and the output-value weight from the task's label to its output
    (``readout``)."""
    with torch.no_grad():
        diag = model.key_query()[:, :D, :D].diagonal(dim1=1, dim2=2).abs()  # (H, D)
        ov = model.output_value()  # (H, T, E)
    mass = torch.stack([diag[:, list(c)].mean(1) for c in ONLY], dim=1)
    readout = torch.stack([ov[:, t, D + t] for t in range(T)], dim=1)
    return {"mass": mass.numpy(), "readout": readout.numpy()}


def figure(models: dict[int, MultiHeadAttention], losses: dict[int, float], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.6 * (len(models) + 1), 3.4))
    axes[0].bar([str(h) for h in losses], list(losses.values()))
    axes[0].set(xlabel="heads", ylabel="test MSE", title="loss by head count")
    for ax, (heads, model) in zip(axes[1:], models.items(), strict=True):
        mass = head_allocation(model)["mass"]
        share = mass / mass.max(axis=1, keepdims=True)  # each head's mass relative to its largest
        image = ax.imshow(share, cmap="magma", aspect="auto", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(T), [f"task {t + 1} only" for t in range(T)])
        ax.set_yticks(range(heads), [f"head {h + 1}" for h in range(heads)])
        ax.set_title(f"H = {heads}: key-query mass (row-scaled)")
        fig.colorbar(image, ax=ax)
    fig.suptitle("In-context multi-task regression: heads split up (H >= 2T) or superpose (H < 2T)")
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("runs/in_context_regression.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {h: train(h, args.steps) for h in args.heads}
    losses = {h: held_out_loss(m) for h, m in models.items()}
    for h, model in models.items():
        allocation = head_allocation(model)
        print(f"H = {h}: test MSE {losses[h]:.4f}")
        for i, (mass, readout) in enumerate(zip(allocation["mass"], allocation["readout"], strict=True)):
            masses = ", ".join(f"{m:.3f}" for m in mass)
            readouts = ", ".join(f"{r:+.2f}" for r in readout)
            print(f"  head {i + 1}: key-query mass by task ({masses}); readout by task ({readouts})")
    print(f"wrote {figure(models, losses, args.out)}")


if __name__ == "__main__":
    main()
