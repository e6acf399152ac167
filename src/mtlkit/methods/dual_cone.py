"""Projections onto the dual cone of the task gradients, solved exactly from the Gramian.

The dual cone of the rows of J is the set of directions that conflict with no task:
``C* = {y : J y >= 0}``. Projecting a combination ``J^T b`` onto it is, by Moreau's decomposition,
``J^T v`` with

    v = argmin_{v >= b} v^T G v        (G = J J^T, componentwise bound)

a non-negative least-squares problem in the Gramian form (``v = b + x``, ``x >= 0``). It is solved
with the active-set method of Lawson & Hanson ("Solving Least Squares Problems", 1974, ch. 23),
written for the normal equations: the free set grows by the most violated KKT condition and each
inner step solves ``G_PP x_P = -(G b)_P`` on the free set, moving back inside the feasible set when
a free variable would turn negative. It terminates finitely with the exact optimum; at the
solution ``G v >= 0`` holds to round-off, so ``J^T v`` conflicts with no task. UPGrad and DualProj
(TorchJD) solve the same problems with quadprog after adding ``1e-4 I`` to the trace-normalised
Gramian, which lets the result conflict with tasks (by up to 5% of a gradient on random Gramians).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _solve(g: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        x = np.linalg.solve(g, rhs)
        if np.all(np.isfinite(x)):
            return x
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(g, rhs, rcond=None)[0]


def nonneg_qp(g: np.ndarray, c: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """``argmin_{x >= 0} x^T G x / 2 + c^T x`` for a positive semi-definite ``G`` whose problem is
    bounded (``c`` in the range of ``G``), by the Lawson-Hanson active-set method."""
    k = len(c)
    x = np.zeros(k)
    free = np.zeros(k, dtype=bool)
    grad = c.copy()
    for _ in range(max_iter):
        violation = np.where(free, 0.0, -grad)
        j = int(np.argmax(violation))
        if violation[j] <= tol:
            break
        free[j] = True
        for _ in range(max_iter):
            idx = np.flatnonzero(free)
            z = np.zeros(k)
            z[idx] = _solve(g[np.ix_(idx, idx)], -c[idx])
            if np.all(z[idx] > 0):
                x = z
                break
            neg = idx[z[idx] <= 0]
            steps = x[neg] / (x[neg] - z[neg])
            alpha = float(np.clip(steps.min(), 0.0, 1.0))
            x = x + alpha * (z - x)
            x[~free] = 0.0
            drop = free & (x <= 1e-15 * max(1.0, float(x.max(initial=0.0))))
            free &= ~drop
            x[drop] = 0.0
            if not free.any():
                break
        grad = g @ x + c
    return x


def project_weights(gram: Tensor, lower: Tensor, tol: float = 1e-13) -> Tensor:
    """``argmin_{v >= b} v^T G v`` for each row ``b`` of ``lower`` (R x K), as an R x K float64
    tensor on ``gram``'s device; ``J^T v`` is the projection of ``J^T b`` onto the dual cone.

    Solved in float64 on the host (a K x K problem per row; cheaper there than many tiny device
    kernels). ``tol`` is relative to the largest diagonal entry of ``G``.
    """
    device = gram.device
    g = gram.detach().to("cpu", torch.float64).numpy()
    b = lower.detach().to("cpu", torch.float64).numpy()
    scale = float(np.max(np.diag(g), initial=0.0))
    out = b.copy()
    if scale > 0:
        g = g / scale  # scale-free: the solution does not depend on the Gramian's scale
        k = g.shape[0]
        for r in range(b.shape[0]):
            out[r] = b[r] + nonneg_qp(g, g @ b[r], tol * max(1.0, float(np.abs(b[r]).max())), 10 * k + 10)
    return torch.from_numpy(out).to(device)
