"""The convex coefficient step of the dual-encoder model: per-task linear coefficients on fixed
latent factors, with a pairwise fusion penalty on the shared-factor coefficients, by ADMM.

Problem (tasks k = 1..T, factors ``Z_k`` (n_k x q), targets ``y_k``, the first ``shared`` columns of
every ``Z_k`` being the shared factors)::

    min_beta  sum_k (1/n_k) ||y_k - Z_k beta_k||^2 + lambda_r sum_k ||beta_k||^2
              + lambda_f sum_{k<l} omega_kl ||beta_k^s - beta_l^s||_2

(an adaptive fused group lasso; intercepts are removed by centring each task's factors and targets
first). ADMM with ``u_kl = beta_k^s - beta_l^s``: the beta-update is one linear system over all
tasks (factorised once), the u-update a group soft-threshold, the dual update the residual. Pairs
whose ``u_kl`` is exactly zero at the end are fused; their connected components are the task
clusters of the shared coefficients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor

from mtlkit.errors import ConfigError


@dataclass
class FusedSolution:
    coefficients: list[Tensor]  # beta_k (q,) per task
    intercepts: list[Tensor]  # b_k per task (from the centring)
    clusters: list[list[int]]  # tasks whose shared coefficients fused, as groups
    iterations: int
    primal_residual: float


def solve_fused_coefficients(
    factors: list[Tensor],
    targets: list[Tensor],
    shared: int,
    lambda_f: float,
    lambda_r: float = 0.0,
    weights: Tensor | None = None,
    rho: float = 1.0,
    iterations: int = 2000,
    tol: float = 1e-8,
) -> FusedSolution:
    """Solve the problem of the module docstring (float64 throughout)."""
    t = len(factors)
    if t == 0 or len(targets) != t:
        raise ConfigError("solve_fused_coefficients needs one target vector per task's factors.")
    q = factors[0].shape[1]
    if any(z.shape[1] != q for z in factors) or not 0 <= shared <= q:
        raise ConfigError(
            f"Every task needs the same number of factors q with 0 <= shared <= q; got {[z.shape for z in factors]}."
        )
    if lambda_f < 0 or lambda_r < 0 or rho <= 0:
        raise ConfigError(
            f"lambda_f and lambda_r must be >= 0 and rho > 0; got {lambda_f}, {lambda_r}, {rho}."
        )
    zs, ys, means = [], [], []
    for z, y in zip(factors, targets, strict=True):
        z, y = z.double(), y.double().reshape(-1)
        zm, ym = z.mean(0), y.mean()
        zs.append(z - zm)
        ys.append(y - ym)
        means.append((zm, ym))
    pairs = list(combinations(range(t), 2))
    omega = torch.ones(len(pairs), dtype=torch.float64) if weights is None else _pair_weights(weights, pairs)
    # H theta = c with H = blockdiag(2 Z^T Z / n + 2 lambda_r I) + rho D^T D
    d = torch.zeros(len(pairs) * shared, t * q, dtype=torch.float64)
    for i, (k, other) in enumerate(pairs):
        rows = slice(i * shared, (i + 1) * shared)
        d[rows, k * q : k * q + shared] = torch.eye(shared, dtype=torch.float64)
        d[rows, other * q : other * q + shared] = -torch.eye(shared, dtype=torch.float64)
    h = torch.block_diag(
        *[2 * z.T @ z / len(z) + 2 * lambda_r * torch.eye(q, dtype=torch.float64) for z in zs]
    )
    base = torch.cat([2 * z.T @ y / len(z) for z, y in zip(zs, ys, strict=True)])
    system = h + rho * d.T @ d
    eigenvalues = torch.linalg.eigvalsh(system)  # small (T q x T q): a numerical rank check
    if float(eigenvalues[0]) <= 1e-10 * float(eigenvalues[-1]):
        raise ConfigError(
            "solve_fused_coefficients: a task's factors are rank-deficient (fewer samples than factors, "
            "or collinear factor columns), so its least-squares problem has no unique solution; give "
            "lambda_r > 0 (a ridge term) or more samples."
        )
    factor = torch.linalg.cholesky(system)
    u = torch.zeros(len(pairs) * shared, dtype=torch.float64)
    v = torch.zeros_like(u)
    theta = torch.zeros(t * q, dtype=torch.float64)
    residual = float("inf")
    step = 0
    while step < iterations:
        step += 1
        theta = torch.cholesky_solve((base + rho * d.T @ (u - v))[:, None], factor)[:, 0]
        diff = d @ theta
        previous = u
        u = _group_threshold(diff + v, lambda_f * omega / rho, shared)
        v = v + diff - u
        residual = float(torch.linalg.vector_norm(diff - u))
        dual = float(rho * torch.linalg.vector_norm(d.T @ (u - previous)))
        if residual < tol and dual < tol:
            break
    else:
        warnings.warn(
            f"solve_fused_coefficients stopped after {iterations} ADMM iterations with a primal residual "
            f"of {residual:.2e} (tolerance {tol:g}); the fused clusters may be incomplete: raise "
            "iterations or rho.",
            RuntimeWarning,
            stacklevel=2,
        )
    betas = [theta[k * q : (k + 1) * q] for k in range(t)]
    intercepts = [ym - zm @ b for (zm, ym), b in zip(means, betas, strict=True)]
    fused = [
        pairs[i] for i in range(len(pairs)) if shared and bool((u[i * shared : (i + 1) * shared] == 0).all())
    ]
    return FusedSolution(betas, intercepts, _components(t, fused), step, residual)


def _pair_weights(weights: Tensor, pairs: list[tuple[int, int]]) -> Tensor:
    w = weights.double()
    return torch.stack([w[k, other] for k, other in pairs]) if w.dim() == 2 else w


def _group_threshold(x: Tensor, thresholds: Tensor, size: int) -> Tensor:
    """Shrink each group of ``size`` entries towards zero by its threshold (exactly zero below it)."""
    if size == 0:
        return x
    groups = x.view(-1, size)
    norms = torch.linalg.vector_norm(groups, dim=1, keepdim=True)
    scale = torch.clamp(1 - thresholds[:, None] / norms.clamp_min(1e-300), min=0.0)
    return (groups * scale).reshape(-1)


def _components(t: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(t))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(t):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())
