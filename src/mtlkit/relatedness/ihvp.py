"""Inverse-Hessian-vector products for influence functions: ``X = (H + damping I)^{-1} B``.

Each solver is named for what it computes; none silently stands in for another:

- ``exact``: the dense Hessian (P Hessian-vector products) and a direct solve; small models.
- ``exact_block``: the same blocks, solved by the Schur complement of the arrowhead structure of
  hard sharing (task blocks couple only through the shared block): ``O(sum_k d_k^3 + p^3)``
  instead of ``O(P^3)``, and refused (with the coupling it found) when the structure is absent.
- ``cg``: conjugate gradient on ``H + damping I`` with exact Hessian-vector products.
- ``lissa``: the stochastic Neumann recursion of Agarwal, Bullins and Hazan (JMLR 2017) as used by
  Koh and Liang (ICML 2017), one mini-batch per step.
- ``ekfac``: the eigenvalue-corrected Kronecker-factored Gauss-Newton of George et al. (NeurIPS
  2018) as used for influence by Grosse et al. (2023), per ``Linear`` layer (:mod:`.ekfac`).
- ``identity``: no curvature (gradient dot products, TracIn-like), an ablation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.relatedness.objective import TrainingObjective

SOLVERS = ("exact", "exact_block", "cg", "lissa", "ekfac", "identity")


def hessian(objective: TrainingObjective, chunk: int = 64) -> Tensor:
    """The dense (P, P) Hessian of the objective (symmetrised against round-off)."""
    eye = torch.eye(objective.dim, dtype=objective.w.dtype, device=objective.w.device)
    h = torch.cat([objective.hvp(eye[i : i + chunk]) for i in range(0, objective.dim, chunk)])
    return 0.5 * (h + h.t())


def auto_damping(objective: TrainingObjective, probes: int = 10, seed: int = 0) -> float:
    """``1e-3 * trace(H) / P``, the trace by Hutchinson's estimator with Rademacher probes."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.randint(0, 2, (probes, objective.dim), generator=g) * 2 - 1).to(objective.w)
    trace = float((v * objective.hvp(v)).sum(1).mean())
    return max(1e-3 * abs(trace) / objective.dim, 1e-12)


def solve_dense(h: Tensor, b: Tensor, damping: float, rcond: float = 1e-10) -> Tensor:
    """``(h + damping I)^{-1} b`` for every row of ``b``, by the eigendecomposition; a (numerically)
    singular matrix is refused rather than inverted into noise."""
    values, vectors = torch.linalg.eigh(h)
    values = values + damping
    largest = float(values.abs().max())
    smallest = float(values.abs().min())
    if not smallest > rcond * largest:
        raise ConfigError(
            f"The Hessian (+ damping {damping:g}) is singular (eigenvalues from {smallest:.3g} to "
            f"{largest:.3g}); pass a positive damping or weight_decay."
        )
    return ((b @ vectors) / values) @ vectors.t()


def block_ranges(
    objective: TrainingObjective, shared: Sequence[int], tasks: Sequence[Sequence[int]]
) -> tuple[Tensor, list[Tensor]]:
    """Flat indices of the shared block and of each task's block, from parameter positions."""
    indices = objective.flat_indices()

    def flat(positions: Sequence[int]) -> Tensor:
        parts = [indices[i] for i in positions]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    return flat(shared), [flat(t) for t in tasks]


def solve_exact_block(
    objective: TrainingObjective,
    b: Tensor,
    shared: Tensor,
    tasks: Sequence[Tensor],
    damping: float,
    chunk: int = 64,
    tolerance: float = 1e-8,
) -> Tensor:
    """Schur-complement solve of the arrowhead system (rows of ``b`` are right-hand sides):
    ``S = H_gg - sum_k H_gk H_kk^{-1} H_kg``, ``x_g = S^{-1} (b_g - sum_k H_gk H_kk^{-1} b_k)``,
    ``x_k = H_kk^{-1} (b_k - H_kg x_g)``."""
    covered = torch.cat([shared, *tasks])
    if covered.numel() != objective.dim or covered.unique().numel() != objective.dim:
        raise ConfigError(
            "exact_block needs every influence parameter in exactly one block (shared or one task's)."
        )
    dtype, device = objective.w.dtype, objective.w.device
    shared, tasks = shared.to(device), [t.to(device) for t in tasks if t.numel()]  # a task may have none
    eye = torch.eye(objective.dim, dtype=dtype, device=device)

    def columns(index: Tensor) -> Tensor:  # H[:, index] as (P, len(index))
        if index.numel() == 0:
            return torch.zeros(objective.dim, 0, dtype=dtype, device=device)
        cols = [objective.hvp(eye[index[i : i + chunk]]) for i in range(0, index.numel(), chunk)]
        return torch.cat(cols).t()

    h_shared = columns(shared)  # (P, p): H_gg and every H_kg
    scale = max(float(h_shared.abs().max()) if h_shared.numel() else 0.0, 1e-300)
    h_gg = h_shared[shared] + damping * torch.eye(len(shared), dtype=dtype, device=device)
    schur = h_gg.clone()
    b = b.t()  # (P, m)
    rhs_g = b[shared].clone()
    inverses = []
    for k, idx in enumerate(tasks):
        cols = columns(idx)  # (P, d_k)
        scale = max(scale, float(cols.abs().max()) if cols.numel() else 0.0)
        others = torch.cat(
            [t for j, t in enumerate(tasks) if j != k] or [torch.zeros(0, dtype=torch.long, device=device)]
        )
        coupling = float(cols[others].abs().max()) if others.numel() and cols.numel() else 0.0
        if coupling > tolerance * scale:
            raise ConfigError(
                f"exact_block: task blocks are coupled (|H_kl| up to {coupling:.3g}, e.g. a soft-sharing "
                "penalty): the Hessian is not arrowhead; use solver='exact' or 'cg'."
            )
        h_kk = cols[idx] + damping * torch.eye(len(idx), dtype=dtype, device=device)
        h_kg = h_shared[idx]  # (d_k, p)
        solved = solve_dense(h_kk, torch.cat([h_kg, b[idx]], dim=1).t(), 0.0).t()
        inv_kg, inv_bk = solved[:, : len(shared)], solved[:, len(shared) :]
        schur -= h_kg.t() @ inv_kg
        rhs_g -= h_kg.t() @ inv_bk
        inverses.append((idx, h_kk, h_kg))
    x = torch.zeros_like(b)
    x_g = solve_dense(schur, rhs_g.t(), 0.0).t() if len(shared) else rhs_g
    x[shared] = x_g
    for idx, h_kk, h_kg in inverses:
        x[idx] = solve_dense(h_kk, (b[idx] - h_kg @ x_g).t(), 0.0).t()
    return x.t()


def solve_cg(
    objective: TrainingObjective,
    b: Tensor,
    damping: float,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
) -> tuple[Tensor, float]:
    """Conjugate gradient on ``H + damping I`` for every row of ``b`` at once (each its own step
    sizes); stops when every relative residual is below ``tolerance``. Returns the solutions and
    the largest relative residual."""

    def apply(v: Tensor) -> Tensor:
        return objective.hvp(v) + damping * v

    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    target = tolerance**2 * (b * b).sum(1)
    for _ in range(max_iterations):
        active = rr > target
        if not bool(active.any()):
            break
        hp = apply(p)
        php = (p * hp).sum(1)
        if bool((php[active] <= 0).any()):
            raise ConfigError(
                "CG met a non-positive curvature direction; raise damping (the Hessian is indefinite)."
            )
        alpha = torch.where(active, rr / php.where(active, torch.ones_like(php)), torch.zeros_like(rr))
        x += alpha[:, None] * p
        r -= alpha[:, None] * hp
        rr_new = (r * r).sum(1)
        beta = torch.where(active, rr_new / rr.where(active, torch.ones_like(rr)), torch.zeros_like(rr))
        p = r + beta[:, None] * p
        rr = rr_new
    worst = float((rr / (b * b).sum(1).clamp_min(1e-300)).max().sqrt())
    if bool((rr > target).any()):
        warnings.warn(
            f"CG stopped after {max_iterations} iterations with a relative residual of {worst:.3g} "
            f"(tolerance {tolerance:g}); raise max_iterations or damping for a converged solve.",
            RuntimeWarning,
            stacklevel=3,
        )
    return x, worst


def top_eigenvalue(objective: TrainingObjective, iterations: int = 20, seed: int = 0) -> float:
    """The Hessian's largest-magnitude eigenvalue by power iteration."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, objective.dim, generator=g).to(objective.w)
    value = 0.0
    for _ in range(iterations):
        hv = objective.hvp(v / v.norm())
        value = float(hv.norm())
        v = hv
    return value


def solve_lissa(
    objective: TrainingObjective,
    b: Tensor,
    damping: float,
    depth: int = 1000,
    repeats: int = 1,
    scale: float | None = None,
    seed: int = 0,
) -> Tensor:
    """``x_{j+1} = b + x_j - (H_batch + damping I) x_j / scale``, returned as ``x_depth / scale``,
    batches drawn at random from the training data; averaged over ``repeats``. ``scale`` defaults
    to 1.1 x (largest eigenvalue + damping), so the recursion contracts."""
    if depth < 1 or repeats < 1:
        raise ConfigError("LiSSA's depth and repeats must be >= 1.")
    scale = scale if scale is not None else 1.1 * (top_eigenvalue(objective) + damping)
    if not scale > 0:
        raise ConfigError(f"LiSSA's scale must be > 0, got {scale!r}.")
    batches = list(objective.batches())
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(b)
    for _ in range(repeats):
        x = b.clone()
        for _ in range(depth):
            batch = batches[int(torch.randint(len(batches), (1,), generator=g))]
            x = b + x - (objective.stochastic_hvp(batch, len(batches), x) + damping * x) / scale
            if not bool(torch.isfinite(x).all()):
                raise ConfigError("LiSSA diverged; raise scale or damping.")
        total += x / scale
    return total / repeats


#: each solver's own options and the values they accept
SOLVER_OPTIONS: dict[
    str, dict[str, tuple[type, float, bool]]
] = {  # name -> (type, lower bound, bound allowed)
    "exact": {"chunk": (int, 1, True)},
    "exact_block": {"chunk": (int, 1, True)},
    "cg": {"max_iterations": (int, 1, True), "tolerance": (float, 0, False)},
    "lissa": {"depth": (int, 1, True), "repeats": (int, 1, True), "scale": (float, 0, False)},
    "ekfac": {},
    "identity": {},
}


def check_solver(name: str, options: Mapping[str, Any] | None = None) -> None:
    """The solver's name, its options' names and their values (type and range)."""
    if name not in SOLVERS:
        raise unknown_name("influence solver", name, SOLVERS)
    allowed = SOLVER_OPTIONS[name]
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ConfigError(f"Solver {name!r} takes options {sorted(allowed)}, not {unknown}.")
    for key, value in (options or {}).items():
        kind, low, inclusive = allowed[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            number = False
        ok = number and math.isfinite(value) and (value >= low if inclusive else value > low)
        if not ok:
            bound = f"{'>=' if inclusive else '>'} {low:g}"
            raise ConfigError(
                f"Solver option {key} must be {'an integer' if kind is int else 'a number'} {bound}, got {value!r}."
            )


def finite_damping(damping: float | None) -> float | None:
    if damping is not None and not (math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"damping must be a finite number >= 0, got {damping!r}.")
    return damping
