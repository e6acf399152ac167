"""Min-norm point of the convex hull of task gradients, from their Gramian.

Solves ``min_{w in simplex} w^T G w`` (the MGDA subproblem of Désidéri, 2012, and Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018) in float64 torch.

Solver: pairwise Frank-Wolfe (Lacoste-Julien & Jaggi, "On the Global Linear Convergence of
Frank-Wolfe Optimization Variants", NeurIPS 2015) with exact line search, started at the vertex of
the smallest gradient, followed by an exact polish on the active set: the equality-constrained KKT
system ``[G_SS 1; 1^T 0] [w_S; -m] = [0; 1]`` is solved and accepted when it is feasible and
optimal. The textbook Frank-Wolfe with TorchJD's stopping rule (step < 1e-3) leaves ||d||^2 a
median 1.7% above the minimum (specs, aggregators §4.1(e)); this solver meets the KKT conditions
to round-off.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pair_min_norm(g11: Tensor, g12: Tensor, g22: Tensor) -> Tensor:
    """Exact weight ``gamma`` on task 1 minimising ``||gamma g1 + (1-gamma) g2||^2``."""
    denom = g11 + g22 - 2 * g12
    gamma = torch.where(denom > 0, (g22 - g12) / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.5)
    return gamma.clamp(0.0, 1.0)


def kkt_violation(gram: Tensor, w: Tensor, active: Tensor | None = None) -> Tensor:
    """Largest violation of the min-norm KKT conditions, relative to the Gramian's scale.

    With ``m = w^T G w``: every task needs ``(G w)_k >= m`` and every task with ``w_k > 0`` needs
    ``(G w)_k = m``.
    """
    gw = gram @ w
    m = w @ gw
    scale = gram.diagonal().abs().max().clamp_min(1e-300)
    mask = torch.ones_like(w, dtype=torch.bool) if active is None else active
    below = (m - gw).clamp_min(0)[mask].max() if mask.any() else gw.new_zeros(())
    support = (w > 0) & mask
    off = (gw - m).abs()[support].max() if support.any() else gw.new_zeros(())
    return torch.maximum(below, off) / scale


def min_norm_weights(
    gram: Tensor,
    active: Tensor | None = None,
    *,
    tol: float = 1e-12,
    max_iter: int = 1000,
    check_every: int = 8,
    init: Tensor | None = None,
) -> Tensor:
    """``argmin_{w in simplex} w^T G w`` for a K x K positive semi-definite ``gram``.

    Args:
        gram: K x K Gramian (any float dtype; solved in float64).
        active: optional bool mask; inactive tasks (e.g. no labelled sample in the batch) get
            weight 0 and are left out of the problem.
        tol: stop when the pairwise duality gap is below ``tol * max_k G_kk``.
        max_iter: cap on Frank-Wolfe iterations (the polish usually ends the solve much earlier).
        check_every: iterations between convergence checks (each check reads one number back).
        init: optional starting weights (e.g. the previous step's solution). Its support is tried
            first by the exact polish, which usually ends the solve at once since MGDA's weights
            move slowly between steps.

    Returns:
        float64 weights on the simplex (all zero only when no task is active).
    """
    g = gram.detach().to(torch.float64)
    k = g.shape[0]
    mask = torch.ones(k, dtype=torch.bool, device=g.device) if active is None else active.to(g.device).bool()
    n_active = int(mask.sum())
    w = torch.zeros(k, dtype=torch.float64, device=g.device)
    if n_active == 0:
        return w
    idx = mask.nonzero().squeeze(1)
    if n_active < k:
        sub_init = init.to(g)[idx] if init is not None else None
        w[idx] = min_norm_weights(
            g[idx][:, idx], tol=tol, max_iter=max_iter, check_every=check_every, init=sub_init
        )
        return w
    scale = g.diagonal().max()
    if k == 1:
        return torch.ones(1, dtype=torch.float64, device=g.device)
    if scale <= 0:  # every gradient is zero: all points are optimal; report the centre
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=g.device)
    if k == 2:
        gamma = pair_min_norm(g[0, 0], g[0, 1], g[1, 1])
        return torch.stack([gamma, 1 - gamma])

    threshold = tol * scale
    if init is not None and init.shape == w.shape and bool((init > 0).any()):
        start = init.to(g).clamp_min(0)
        polished = _polish(g, start / start.sum())
        if polished is not None:
            return polished
        w = start / start.sum()
    else:
        w[torch.argmin(g.diagonal())] = 1.0
    gw = g @ w
    big = torch.tensor(float("inf"), dtype=torch.float64, device=g.device)
    for it in range(max_iter):
        t = torch.argmin(gw)
        s = torch.argmax(torch.where(w > 0, gw, -big))
        gap = gw[s] - gw[t]
        curvature = g[t, t] + g[s, s] - 2 * g[t, s]
        step = torch.where(curvature > 0, gap / curvature.clamp_min(1e-300), w[s])
        step = torch.minimum(step, w[s]).clamp_min(0)
        w[t] += step
        w[s] -= step
        gw += step * (g[:, t] - g[:, s])
        if (it + 1) % check_every == 0:
            polished = _polish(g, w)
            if polished is not None:
                return polished
            if gap <= threshold:
                break
    w.clamp_(min=0)
    return w / w.sum()


def _polish(g: Tensor, w: Tensor) -> Tensor | None:
    """Exact solution on the current support, if it is feasible and optimal; else ``None``."""
    support = (w > 1e-14).nonzero().squeeze(1)
    n = support.numel()
    kkt = torch.zeros(n + 1, n + 1, dtype=g.dtype, device=g.device)
    kkt[:n, :n] = g[support][:, support]
    kkt[:n, n] = 1
    kkt[n, :n] = 1
    rhs = torch.zeros(n + 1, dtype=g.dtype, device=g.device)
    rhs[n] = 1
    sol, info = torch.linalg.solve_ex(kkt, rhs)
    if info.item() != 0 or not torch.isfinite(sol).all():
        sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1)).solution.squeeze(1)
    cand = torch.zeros_like(w)
    cand[support] = sol[:n]
    if (cand < -1e-12).any():
        return None
    cand.clamp_(min=0)
    cand /= cand.sum()
    if kkt_violation(g, cand) > 1e-9:
        return None
    return cand
