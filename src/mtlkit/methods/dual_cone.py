"""Projections onto the dual cone of the task gradients, solved exactly from the Gramian.

The dual cone of the rows of J is the set of directions that conflict with no task:
``C* = {y : J y >= 0}``. Projecting a combination ``J^T b`` onto it is, by Moreau's decomposition,
``J^T v`` with

    v = argmin_{v >= b} v^T G v        (G = J J^T, componentwise bound)

a non-negative least-squares problem in the Gramian form (``v = b + x``, ``x >= 0``). UPGrad needs
K of them (one per task, the same G) and DualProj one, so they are solved together, batched, in
float64 torch on the Gramian's device, by block principal pivoting (Júdice & Pires, "A block
principal pivoting algorithm for large-scale strictly monotone linear complementarity problems",
Computers & Operations Research 1994; in the multi-right-hand-side form of Kim & Park, "Fast
nonnegative matrix factorization: an active-set-like method and comparisons", SIAM J. Sci.
Comput. 2011). Every iteration solves each problem exactly on its current free set (one batched
Cholesky solve) and exchanges *all* variables that violate the KKT conditions at once; after three
exchanges that do not reduce the number of violations a problem falls back to exchanging one
variable (Murty's rule), which guarantees termination in exact arithmetic. It stops at the exact
optimum (no fixed iteration count); a warm start from the previous step's free sets usually ends it
after one or two solves. Where round-off on an ill-conditioned free set makes the exchanges cycle
(seen with K > d), those problems are finished by SciPy's Lawson-Hanson NNLS on a square factor of
the Gramian instead of returning a point that violates the KKT conditions. At the solution
``G v >= 0`` holds to round-off, so ``J^T v`` conflicts with no task.

Rank-deficient Gramians (duplicated tasks, K > d) make the free-set systems singular; they are
solved with a ridge of ``1e-11`` of the largest diagonal entry, which the consistent right-hand
sides (``G b`` lies in the range of G) make harmless: three refinement steps against the unridged
system remove its bias where the free set's smallest eigenvalue is well above the ridge.
UPGrad and DualProj in TorchJD solve the same problems with quadprog after adding ``1e-4 I`` to the
trace-normalised Gramian, which lets the result conflict with tasks (by up to 5% of a gradient on
random Gramians); the reference here for tests is SciPy's NNLS on J.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Ridge relative to the largest diagonal entry, for the singular free-set systems of
#: rank-deficient Gramians.
RIDGE = 1e-11
#: refinement steps after the ridged solve
REFINEMENTS = 3


def nonneg_qp_batched(
    gram: Tensor,
    linear: Tensor,
    *,
    free: Tensor | None = None,
    tol: float = 1e-12,
    max_iter: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``argmin_{x >= 0} x^T G x / 2 + c_r^T x`` for every row ``c_r`` of ``linear`` (R x K).

    ``G`` must be positive semi-definite with ``c_r`` in its range (so every problem is bounded);
    ``free`` (R x K bool) is an optional warm start: the variables expected to be positive.
    Returns the solutions (R x K, float64, ``>= 0``) and their free sets (for the next warm start).
    """
    g = gram.to(torch.float64)
    c = linear.to(torch.float64)
    r, k = c.shape
    scale = float(g.diagonal().max()) if k else 0.0
    if scale <= 0 or r == 0:
        return torch.zeros_like(c), torch.zeros_like(c, dtype=torch.bool)
    g, c = g / scale, c / scale
    tol_abs = tol * max(1.0, float(c.abs().max()))
    f = (
        free.to(device=c.device, dtype=torch.bool).clone()
        if free is not None and free.shape == c.shape
        else torch.zeros_like(c, dtype=torch.bool)
    )
    best = torch.full((r,), k + 1, dtype=torch.long, device=c.device)
    tries = torch.full((r,), 3, dtype=torch.long, device=c.device)
    positions = torch.arange(k, device=c.device)
    x = torch.zeros_like(c)
    pending = torch.ones(r, dtype=torch.bool, device=c.device)  # rows whose free set changed
    stale = torch.zeros(r, dtype=torch.long, device=c.device)  # iterations since the count last fell
    stuck = torch.zeros(r, dtype=torch.bool, device=c.device)  # cycling on round-off: finished below
    limit = max_iter if max_iter is not None else 10 * k + 20
    for _ in range(limit):
        rows = pending.nonzero().squeeze(1)
        x[rows] = _solve_on_free_sets(g, c[rows], f[rows])
        y = x @ g + c  # the KKT multipliers on the fixed variables
        bad = ((f & (x < -tol_abs)) | (~f & (y < -tol_abs))) & ~stuck[:, None]
        count = bad.sum(1)
        if not bool(count.any()):
            break
        # Júdice-Pires / Kim-Park rule: exchange every violator while that reduces their number
        # (or for three more tries), else only the one with the largest index.
        better = count < best
        full = better | (tries > 0)
        tries = torch.where(better, 3, torch.where(full, tries - 1, tries))
        best = torch.where(better, count, best)
        # k + 20 exchanges without fewer violations: the exchanges cycle on round-off (an
        # ill-conditioned free set); those rows leave the loop instead of running to the limit
        stale = torch.where(better, 0, stale + 1)
        stuck = stuck | ((stale > k + 20) & (count > 0))
        last = torch.where(bad, positions, -1).max(1).values
        single = positions[None, :] == last[:, None]
        pending = (count > 0) & ~stuck
        f = f ^ (torch.where(full[:, None], bad, single) & pending[:, None])
        if not bool(pending.any()):
            break
    else:
        stuck = stuck | pending
    rows = stuck.nonzero().squeeze(1)
    if rows.numel():  # Lawson-Hanson finishes the rows the exchanges could not
        x[rows], f[rows] = _lawson_hanson(g, c[rows])
    return x.clamp_min(0), f


def _lawson_hanson(g: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The same problems by SciPy's active-set NNLS (Lawson & Hanson) on a square factor ``R``
    of ``G`` (``G = R^T R`` from its eigendecomposition; ``c = G b`` gives the least-squares
    form ``min_{x >= 0} ||R x + R b||``), on the CPU: slower, but it works on ``R``, whose
    condition number is the square root of ``G``'s, and it terminates."""
    from scipy.optimize import nnls

    values, vectors = torch.linalg.eigh(g.cpu())
    keep = values > values.max() * 1e-15
    r = (vectors[:, keep] * values[keep].sqrt()).T  # rank x K
    # c = G b = R^T (R b): the target -R b is -(pinv(R^T) c)
    target = -((vectors[:, keep] / values[keep].sqrt()).T @ c.cpu().T).T
    out = torch.zeros_like(c)
    for i in range(c.shape[0]):
        solution, _ = nnls(r.numpy(), target[i].numpy(), maxiter=50 * c.shape[1])
        out[i] = torch.from_numpy(solution).to(c)
    return out, out > 0


def _solve_on_free_sets(g: Tensor, c: Tensor, free: Tensor) -> Tensor:
    """Solve ``G_FF x_F = -c_F`` for every row's free set F (x = 0 elsewhere), batched: the free
    variables are gathered into systems of the largest free-set size, padded with identity rows
    (the padding slots index an identity block appended to the Gramian)."""
    x = torch.zeros_like(c)
    sizes = free.sum(1)
    m = int(sizes.max()) if sizes.numel() else 0
    if m == 0:
        return x
    k = g.shape[0]
    order = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :m]  # free positions first
    valid = torch.arange(m, device=c.device)[None, :] < sizes[:, None]
    positions = torch.arange(m, device=c.device)
    padded = torch.where(valid, order, k + positions[None, :])  # a distinct padding index per slot
    extended = torch.zeros(k + m, k + m, dtype=g.dtype, device=g.device)
    extended[:k, :k] = g
    extended[k:, k:] = torch.eye(m, dtype=g.dtype, device=g.device)
    a = extended[padded[:, :, None], padded[:, None, :]]
    rhs = torch.where(valid, -torch.gather(c, 1, order), 0.0)[..., None]
    ridge = RIDGE * valid.to(g.dtype)
    a.diagonal(dim1=1, dim2=2).add_(ridge)
    factor, info = torch.linalg.cholesky_ex(a)
    sol = torch.cholesky_solve(rhs, factor)
    # refinement against the system without the ridge undoes the ridge's bias; ill-conditioned
    # free sets (K > d, where the optimal weights can be large) need more than one step
    for _ in range(REFINEMENTS):
        residual = rhs - (a @ sol - ridge[..., None] * sol)
        sol = sol + torch.cholesky_solve(residual, factor)
    if bool((info != 0).any()):  # numerically indefinite: a pseudo-inverse for those problems
        broken = info != 0
        a.diagonal(dim1=1, dim2=2).sub_(ridge)
        sol[broken] = torch.linalg.pinv(a[broken], hermitian=True) @ rhs[broken]
    x.scatter_(1, order, torch.where(valid, sol[..., 0], 0.0))
    return x


def project_weights(
    gram: Tensor, lower: Tensor, *, free: Tensor | None = None, tol: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """``argmin_{v >= b} v^T G v`` for each row ``b`` of ``lower`` (R x K), as an R x K float64
    tensor on ``gram``'s device (``J^T v`` is the projection of ``J^T b`` onto the dual cone),
    and the free sets for a warm start. The solution does not depend on the Gramian's scale."""
    g = gram.detach().to(torch.float64)
    b = lower.detach().to(device=g.device, dtype=torch.float64)
    x, f = nonneg_qp_batched(g, b @ g, free=free, tol=tol)
    return b + x, f
