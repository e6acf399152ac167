"""The dual-encoder model for heterogeneous tasks and its alternating fit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, ShapeMismatchError
from mtlkit.models.base import (
    MultiTaskModule,
    MultiTaskOutput,
    check_input,
    mlp,
    register,
    resolve_out_features,
)
from mtlkit.models.fused_coefficients import FusedSolution, solve_fused_coefficients


@register("dual_encoder")
class DualEncoder(MultiTaskModule):
    """Dual-encoder multi-task learning: Sui, Xu, Bai, Qu, "Multi-task Learning for Heterogeneous
    Data via Integrating Shared and Task-Specific Encodings", arXiv 2505.24281, 2025.
    A **reconstruction** from the abstract and the specification this library follows (no code
    was found): task k predicts from ``z_k(x) = [g(x); f_k(x)]``, a shared encoding (``shared_dim``)
    and its own (``task_dim``), with a linear head ``beta_k = [beta_k^s; beta_k^p]``.
    :func:`fit_alternating` is the unified algorithm: with the encoders fixed, a convex step fits
    every task's coefficients with a fusion penalty that pulls the shared-factor coefficients of
    similar tasks together (:mod:`mtlkit.models.fused_coefficients`); with the coefficients fixed,
    gradient steps on the encoders; the tasks whose shared coefficients fuse are the posterior
    similarity structure. Trained by any method instead (the Trainer), the model is plain gradient
    training; ``orthogonality`` adds ``||g(X)^T f_k(X)||_F^2 / n^2`` per task as an auxiliary loss
    (keeps the encodings from duplicating each other).

    ``hidden_dims`` () gives linear encoders (the latent-factor regression view); otherwise MLPs.
    ``task_dim=0`` with no fusion is hard-sharing regression on ``g``. Identifiability (found by
    testing): with one output per task a ``task_dim``-wide own encoder can carry the task's whole
    function, so ``g`` is pinned to the shared factor space only when each task needs more
    dimensions than its own encoding offers (several outputs, as in the tests, or the fusion and
    ridge penalties).
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 1,
        shared_dim: int = 4,
        task_dim: int = 2,
        hidden_dims: Sequence[int] = (),
        orthogonality: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        if shared_dim < 1 or task_dim < 0 or orthogonality < 0:
            raise ConfigError(
                f"dual_encoder needs shared_dim >= 1, task_dim >= 0, orthogonality >= 0; got {shared_dim}, {task_dim}, {orthogonality}."
            )
        outs = resolve_out_features(self.task_names, out_features)
        self.in_features, self.shared_dim, self.task_dim = in_features, shared_dim, task_dim
        self.orthogonality = orthogonality
        self.shared = self._encoder(in_features, hidden_dims, shared_dim)
        self.own = nn.ModuleDict(
            {t: self._encoder(in_features, hidden_dims, task_dim) for t in self.task_names}
            if task_dim
            else {}
        )
        self.heads = nn.ModuleDict({t: nn.Linear(shared_dim + task_dim, outs[t]) for t in self.task_names})

    @staticmethod
    def _encoder(width: int, hidden: Sequence[int], out: int) -> nn.Module:
        return (
            nn.Linear(width, out, bias=False) if not hidden else mlp(width, hidden, "relu", out_features=out)
        )

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.shared]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.heads[task], *([self.own[task]] if self.task_dim else [])]

    def encodings(self, x: Tensor, task: str) -> Tensor:
        """``z_k(x) = [g(x); f_k(x)]``."""
        g = self.shared(x)
        return torch.cat([g, self.own[task](x)], dim=1) if self.task_dim else g

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        check_input(x, self.in_features, "DualEncoder")
        g = self.shared(x)
        predictions, aux = {}, {}
        for t in tasks:
            f = self.own[t](x) if self.task_dim else None
            z = torch.cat([g, f], dim=1) if f is not None else g
            predictions[t] = self.heads[t](z)
            if f is not None and self.orthogonality and self.training:
                aux[f"orthogonality/{t}"] = self.orthogonality * (g.T @ f).pow(2).sum() / len(x) ** 2
        return MultiTaskOutput(predictions, g, aux or None)

    def shared_angle(self, basis: Tensor) -> float:
        """The largest principal angle, in degrees, between the span of the (linear) shared
        encoder's rows and the span of ``basis``'s rows (0: the shared factor space found)."""
        if not isinstance(self.shared, nn.Linear):
            raise ConfigError("shared_angle needs a linear shared encoder (hidden_dims=()).")
        learned = torch.linalg.qr(self.shared.weight.detach().T)[0]
        truth = torch.linalg.qr(basis.T.to(learned))[0]
        cosines = torch.linalg.svdvals(learned.T @ truth).clamp(max=1.0)
        return float(torch.rad2deg(torch.acos(cosines)).max())

    def shared_coefficients(self) -> Tensor:
        """(T, shared_dim): each task's coefficients on the shared factors (single-output heads)."""
        return torch.stack(
            [cast(nn.Linear, self.heads[t]).weight[0, : self.shared_dim] for t in self.task_names]
        )


def fit_alternating(
    model: DualEncoder,
    data: Mapping[str, tuple[Tensor, Tensor]],
    lambda_f: float,
    lambda_r: float = 0.0,
    adaptive: bool = True,
    outer: int = 10,
    encoder_steps: int = 50,
    lr: float = 1e-2,
) -> FusedSolution:
    """The dual-encoder's alternating algorithm on each task's own data ``{task: (X_k, y_k)}``
    (regression, one output): a pilot fit without fusion gives the adaptive weights
    ``omega_kl = 1 / ||beta~_k^s - beta~_l^s||`` (``adaptive``; else 1); then ``outer`` rounds of
    (a) the convex coefficient step on the current encodings, written into the heads, and
    (b) ``encoder_steps`` Adam steps on the encoders with the heads fixed (mean of the tasks' MSEs,
    plus the orthogonality penalty). Returns the last coefficient step (with the task clusters)."""
    names = model.task_names
    if set(data) != set(names):
        raise ConfigError(f"fit_alternating needs data for every task {names}; got {sorted(data)}.")
    heads = [cast(nn.Linear, model.heads[t]) for t in names]
    if any(h.out_features != 1 for h in heads):
        raise ConfigError("fit_alternating fits one-output regression heads.")
    data = dict(data)
    for t in names:
        x, y = data[t]
        if y.dim() > 2 or (y.dim() == 2 and y.shape[1] != 1) or y.shape[0] != x.shape[0]:
            raise ShapeMismatchError(
                f"fit_alternating: task {t!r} needs targets of shape ({x.shape[0]},) or "
                f"({x.shape[0]}, 1) for its {x.shape[0]} inputs; got {tuple(y.shape)}."
            )
        data[t] = (x, y.reshape(-1))  # (n, 1) targets against (n,) predictions would broadcast
    head_ids = {id(q) for h in heads for q in h.parameters()}
    encoders = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.Adam(encoders, lr=lr) if encoder_steps else None

    def solve(lam: float, weights: Tensor | None) -> FusedSolution:
        with torch.no_grad():
            factors = [model.encodings(data[t][0], t) for t in names]
        return solve_fused_coefficients(
            factors, [data[t][1] for t in names], model.shared_dim, lam, lambda_r, weights
        )

    weights = None
    if adaptive and lambda_f > 0:
        pilot = solve(0.0, None)
        shared = torch.stack([b[: model.shared_dim] for b in pilot.coefficients])
        weights = torch.zeros(len(names), len(names), dtype=torch.float64)
        for k, other in combinations(range(len(names)), 2):
            weights[k, other] = 1.0 / max(float(torch.linalg.vector_norm(shared[k] - shared[other])), 1e-12)
    solution = solve(lambda_f, weights)
    for _ in range(outer):
        _write_heads(heads, solution)
        for _ in range(encoder_steps):
            assert optimizer is not None
            optimizer.zero_grad()
            out = [model(data[t][0], task=t, full_output=True) for t in names]
            loss = sum(
                (o.predictions[t].squeeze(1) - data[t][1]).pow(2).mean() + sum((o.aux_losses or {}).values())
                for o, t in zip(out, names, strict=True)
            ) / len(names)
            loss.backward()
            for head in heads:
                head.zero_grad(set_to_none=True)
            optimizer.step()
        solution = solve(lambda_f, weights)
    _write_heads(heads, solution)
    return solution


def _write_heads(heads: list[nn.Linear], solution: FusedSolution) -> None:
    with torch.no_grad():
        for head, beta, b in zip(heads, solution.coefficients, solution.intercepts, strict=True):
            head.weight.copy_(beta.to(head.weight.dtype)[None])
            head.bias.copy_(b.to(head.bias.dtype).reshape(1))
