"""ADH-MTL-style double-heterogeneity multi-task learning: group-level models for new patients, a
decomposed predictor per (group, task), and a hierarchical prior with dependencies among tasks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.models.base import (
    MultiTaskModule,
    MultiTaskOutput,
    check_input,
    mlp,
    register,
    resolve_out_features,
)


@register("adh_mtl")
class ADHMTL(MultiTaskModule):
    """A **reconstruction** of ADH-MTL: Chai, Liu, Xie, Wang, Fang, "Collaborative Management for
    Chronic Diseases and Depression: A Double Heterogeneity-based Multi-Task Learning Method",
    arXiv 2511.16398, 2025 (no code or hyper-parameters are public; the forms below are this
    library's specification of the abstract's three ideas).

    The input row is ``[patient summary (summary_dim); features]``. (1) **Group-level modelling**:
    the patient is assigned to the nearest of ``num_groups`` group centroids of the summary
    (:meth:`fit_groups`, k-means on the training patients only), so a new patient uses its group's
    model. (2) **Decomposition**: a shared extractor ``h`` (an MLP over the features) and, for group g
    and task d, the predictor ``W_{g,d} = W_0 + U_g + V_d`` (G + D + 1 components instead of G x D),
    optionally low-rank ``U_g``, ``V_d`` (``rank``). (3) **Hierarchical prior** (a Gaussian Bayesian
    network over the components, as MAP penalties in the auxiliary loss ``adh_prior``):
    ``lambda_0 ||W_0||^2 + lambda_g sum_g ||U_g||^2 + lambda_d sum_d ||V_d - sum_d' A_dd' V_d'||^2``
    with a fixed dependency matrix ``dependencies`` A (zero diagonal; a task depending on others, e.g.
    depression on the physical diseases). ``W_0`` and ``U_g`` serve every task (shared); ``V_d`` is
    task d's own. With ``num_groups=1`` and ``lambda_g`` irrelevant it is a per-task decomposed model.
    """

    centroids: Tensor
    dependencies: Tensor
    groups_fitted: Tensor

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 1,
        summary_dim: int = 0,
        num_groups: int = 1,
        hidden_dims: Sequence[int] = (32,),
        rank: int | None = None,
        lambda_0: float = 1e-3,
        lambda_g: float = 1e-3,
        lambda_d: float = 1e-3,
        dependencies: Tensor | None = None,
    ) -> None:
        super().__init__(tasks)
        t = len(self.task_names)
        if not 0 <= summary_dim < in_features or num_groups < 1 or min(lambda_0, lambda_g, lambda_d) < 0:
            raise ConfigError(
                f"adh_mtl needs 0 <= summary_dim < in_features, num_groups >= 1 and penalties >= 0; got "
                f"summary_dim={summary_dim}, in_features={in_features}, num_groups={num_groups}."
            )
        if dependencies is not None and (
            dependencies.shape != (t, t) or bool(dependencies.diagonal().ne(0).any())
        ):
            raise ConfigError(f"dependencies must be a {t} x {t} matrix with a zero diagonal.")
        self.in_features, self.summary_dim, self.num_groups = in_features, summary_dim, num_groups
        self.lambdas = (float(lambda_0), float(lambda_g), float(lambda_d))
        width = hidden_dims[-1] if hidden_dims else in_features - summary_dim
        self.extractor = mlp(in_features - summary_dim, hidden_dims, "relu") if hidden_dims else nn.Identity()
        self.outs = resolve_out_features(self.task_names, out_features)
        rows = max(self.outs.values())
        if dependencies is not None and len(set(self.outs.values())) > 1:
            raise ConfigError("adh_mtl: dependencies between tasks need one output width for every task.")
        # W_0 starts like a linear layer; the group and task deviations start at zero (their prior mean)
        self.w0 = nn.Parameter(torch.empty(rows, width).uniform_(-(width**-0.5), width**-0.5))
        self.rank = rank
        self.group_part = _Components(num_groups, rows, width, rank)
        self.task_parts = nn.ModuleDict(
            {n: _Components(1, self.outs[n], width, rank, bias=True) for n in self.task_names}
        )
        self.register_buffer(
            "dependencies", dependencies.float() if dependencies is not None else torch.zeros(t, t)
        )
        self.register_buffer("centroids", torch.zeros(num_groups, summary_dim))
        # whether fit_groups has run (kept in checkpoints): unfitted centroids would put everyone in group 0
        self.register_buffer("groups_fitted", torch.tensor(False))
        self.last_groups: Tensor | None = None

    # -- grouping --------------------------------------------------------------------------------------
    def fit_groups(self, summaries: Tensor, iterations: int = 100, seed: int = 0) -> Tensor:
        """k-means (k-means++ start) on the training patients' summaries (one row per patient);
        stores the centroids and returns each patient's group."""
        if self.summary_dim == 0 or summaries.shape[1] != self.summary_dim:
            raise ConfigError(f"fit_groups needs (patients, {self.summary_dim}) summaries.")
        if len(summaries) < self.num_groups:
            raise ConfigError(f"{len(summaries)} patients cannot form {self.num_groups} groups.")
        g = torch.Generator().manual_seed(seed)
        x = summaries.detach().double().cpu()
        centres = [x[int(torch.randint(len(x), (1,), generator=g))]]
        for _ in range(1, self.num_groups):
            d2 = torch.cdist(x, torch.stack(centres)).min(1).values.pow(2)
            centres.append(x[int(torch.multinomial(d2 / d2.sum(), 1, generator=g))])
        c = torch.stack(centres)
        for _ in range(iterations):
            assign = torch.cdist(x, c).argmin(1)
            new = torch.stack(
                [x[assign == k].mean(0) if bool((assign == k).any()) else c[k] for k in range(len(c))]
            )
            if torch.allclose(new, c):
                break
            c = new
        self.centroids.copy_(c.to(self.centroids))
        self.groups_fitted.fill_(True)
        return torch.cdist(x, c).argmin(1)

    def set_centroids(self, centroids: Tensor) -> None:
        """Known group centres (``(num_groups, summary_dim)``) instead of :meth:`fit_groups`."""
        if tuple(centroids.shape) != tuple(self.centroids.shape):
            raise ConfigError(
                f"set_centroids needs shape {tuple(self.centroids.shape)}, got {tuple(centroids.shape)}."
            )
        with torch.no_grad():
            self.centroids.copy_(centroids)
        self.groups_fitted.fill_(True)

    def groups_of(self, x: Tensor) -> Tensor:
        """Each row's group: the nearest centroid of its summary (all 0 with one group)."""
        if self.num_groups == 1 or self.summary_dim == 0:
            return torch.zeros(len(x), dtype=torch.long, device=x.device)
        if not bool(self.groups_fitted):
            raise ConfigError(
                f"adh_mtl has {self.num_groups} groups but no centroids: call fit_groups(summaries) on the "
                "training patients before training or predicting."
            )
        return torch.cdist(x[:, : self.summary_dim], self.centroids.to(x.dtype)).argmin(1)

    # -- the contract ------------------------------------------------------------------------------------
    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.extractor, self.group_part]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.w0, *super().shared_parameters()]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.task_parts[task]]

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        check_input(x, self.in_features, "ADHMTL")
        groups = self.groups_of(x)
        self.last_groups = groups.detach()
        h = self.extractor(x[:, self.summary_dim :])
        rows = self.w0.shape[0]
        base = torch.einsum("bw,bow->bo", h, self.w0 + self.group_part.weights()[groups])  # (W_0 + U_g) h
        z = torch.cat([h, base], dim=1)  # what every task reads
        h, base = z[:, :-rows], z[:, -rows:]
        predictions = {}
        for t in tasks:
            part = cast(_Components, self.task_parts[t])
            predictions[t] = base[:, : self.outs[t]] + h @ part.weights()[0].T + cast(Tensor, part.bias)
        aux = {"adh_prior": self.prior()} if self.training and any(self.lambdas) else None
        return MultiTaskOutput(predictions, z, aux)

    def prior(self) -> Tensor:
        """The negative log-prior of the components (the MAP penalties)."""
        lam0, lamg, lamd = self.lambdas
        vs = [cast(_Components, self.task_parts[t]).weights()[0].flatten() for t in self.task_names]
        if len(set(self.outs.values())) == 1:
            v = torch.stack(vs)
            task_term = (v - self.dependencies.to(v.dtype) @ v).pow(2).sum()
        else:  # different output widths: no dependencies (refused at construction)
            task_term = sum((x.pow(2).sum() for x in vs), self.w0.new_zeros(()))
        return lam0 * self.w0.pow(2).sum() + lamg * self.group_part.weights().pow(2).sum() + lamd * task_term

    def predictor(self, group: int, task: str) -> Tensor:
        """``W_{g,d} = W_0 + U_g + V_d`` (task d's output rows)."""
        out = self.outs[task]
        part = cast(_Components, self.task_parts[task])
        return self.w0[:out] + self.group_part.weights()[group][:out] + part.weights()[0]

    def routing_statistics(self) -> dict[str, float]:
        if self.last_groups is None or self.num_groups == 1:
            return {}
        counts = torch.bincount(self.last_groups, minlength=self.num_groups).float()
        return {f"group/{k}/share": float(c / counts.sum()) for k, c in enumerate(counts)}


class _Components(nn.Module):
    """``n`` matrices (rows x width), full or low-rank (``rank``: each ``L_i R^T``, with a shared
    right factor), and an optional bias per row."""

    def __init__(self, n: int, rows: int, width: int, rank: int | None, bias: bool = False) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(rows)) if bias else None
        if rank is None:
            self.full = nn.Parameter(torch.zeros(n, rows, width))
        else:
            self.left = nn.Parameter(torch.randn(n, rows, rank) * 0.01)
            self.right = nn.Parameter(torch.randn(width, rank) * 0.01)
        self.rank = rank

    def weights(self) -> Tensor:
        return self.full if self.rank is None else self.left @ self.right.T
