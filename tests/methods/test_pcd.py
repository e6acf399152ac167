"""PCD: the KKT conditions of the paper's problem, its closed forms and special cases, the EMA
normalisation, the primary/tau options, agreement with TorchJD 0.18 and an end-to-end step."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

import mtlkit as mk
from mtlkit.errors import ConfigError
from mtlkit.methods.pcd import PCD, kkt_residual, pcd_multipliers, pcd_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad

F64 = torch.float64


def first_step_scales(J, eps=1e-8):
    """The scales after one EMA step: the bias correction makes the average ||g_i||^2 itself."""
    return 1.0 / ((J * J).sum(1) + eps).sqrt()


def method_for(k, **options):
    method = PCD(**options)
    method.setup([f"t{i}" for i in range(k)])
    return method


def call(method, G):
    return method.weights(G, torch.ones(len(G), dtype=F64))


def primal_kkt(H, taus, mu):
    """The KKT conditions checked on the normalised gradients themselves (rows of H, primary
    first), not through the Gramian: d = h_1 + sum mu_j h_j, mu >= 0, every constraint holds and
    the binding ones are tight. Relative to ||h_j|| (||h_1|| + ||d||)."""
    d = H[0] + mu @ H[1:]
    norms = H[1:].norm(dim=1)
    slack = H[1:] @ d - taus * norms**2
    size = norms * (H[0].norm() + d.norm()) + taus * norms**2 + 1e-300
    return d, float(
        torch.cat([(-mu).clamp_min(0), (-slack).clamp_min(0) / size, (mu > 0) * slack.abs() / size]).max()
    )


def enumerate_kkt(H, taus):
    """Independent reference: the KKT system solved on every working set (smallest first), as
    the paper's Appendix B.2 does; returns d~ or None when no working set is feasible."""
    G = (H @ H.T).numpy()
    S, b = G[1:, 1:], taus.numpy() * np.diag(G)[1:] - G[1:, 0]
    candidates = [j for j in range(len(b)) if S[j, j] > 0]
    if np.all(b <= 0):
        return H[0]
    for size in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, size):
            A = list(subset)
            n = np.sqrt(np.diag(S)[A])
            if np.linalg.eigvalsh(S[np.ix_(A, A)] / np.outer(n, n))[0] < 1e-9:
                continue
            mu = np.linalg.solve(S[np.ix_(A, A)], b[A])
            if (mu < -1e-12).any():
                continue
            full = np.zeros(len(b))
            full[A] = np.maximum(mu, 0)
            if (S @ full - b >= -1e-10 * np.sqrt(np.diag(S)) * (1 + full @ np.sqrt(np.diag(S)))).all():
                return H[0] + torch.from_numpy(full) @ H[1:]
    return None


def farkas_certificate(H, taus):
    """max sum_j y_j tau_j ||h_j|| over y >= 0, sum y = 1, sum_j y_j h_j / ||h_j|| = 0, relative to
    max_j tau_j ||h_j||: positive iff the constraints are incompatible (Farkas' lemma), by an LP
    independent of the solver."""
    A = H[1:].numpy()
    norms = np.linalg.norm(A, axis=1)
    keep = norms > 0
    A, norms, t = A[keep], norms[keep], taus.numpy()[keep]
    if len(A) == 0:
        return -1.0
    res = linprog(
        -(t * norms),
        A_eq=np.vstack([(A / norms[:, None]).T, np.ones(len(A))]),
        b_eq=np.r_[np.zeros(A.shape[1]), 1.0],
        bounds=(0, None),
        method="highs",
    )
    value = -res.fun if res.status == 0 else -1.0
    return value / max(float(t.max() * norms.max()), 1e-300)  # relative to its largest possible value


def structured(k, d, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, d, generator=gen, dtype=F64)
    if kind == "conflict":  # secondaries pulled against the primary
        J[1:] -= 2 * torch.rand(k - 1, 1, generator=gen, dtype=F64) * J[0]
    elif kind == "duplicates":  # repeated rows at other scales, some reversed
        idx = torch.randint(0, k, (k,), generator=gen)
        J = J[idx] * torch.randn(k, 1, generator=gen, dtype=F64)
    elif kind == "zeros":
        J[torch.rand(k, generator=gen) < 0.3] = 0.0
    return J


# -- the problem and its solver -------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("seed", range(8))
def test_two_objectives_match_the_closed_form(tau, seed):
    # Cor. 4.6: mu = max(0, (tau ||h2||^2 - <h1, h2>) / ||h2||^2); d = (h1 + mu h2) ||g1|| / ||d~||
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(2, 6, generator=gen, dtype=F64)
    J[1] -= (seed % 3) * J[0]
    s = first_step_scales(J)
    h1, h2 = s[0] * J[0], s[1] * J[1]
    mu = max(0.0, float((tau * h2 @ h2 - h1 @ h2) / (h2 @ h2)))
    expected = (h1 + mu * h2) * J[0].norm() / (h1 + mu * h2).norm()
    w, _ = pcd_weights(J @ J.T, tau, s)
    torch.testing.assert_close(J.T @ w, expected, atol=1e-12, rtol=0)
    assert w[0] > 0 and w[1] >= 0


@given(
    k=st.integers(2, 10),
    d=st.integers(1, 8),
    kind=st.sampled_from(["random", "conflict", "duplicates", "zeros"]),
    tau=st.sampled_from([0.0, 0.02, 0.5, 1.0]) | st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
@example(k=5, d=1, kind="zeros", tau=2.225073858507203e-309, seed=0)  # a subnormal tau, once flaky
@settings(max_examples=80, deadline=None)
def test_the_kkt_conditions_hold_or_the_constraints_are_incompatible(k, d, kind, tau, seed):
    H = structured(k, d, kind, seed)
    taus = torch.full((k - 1,), tau, dtype=F64)
    sol = pcd_multipliers(H @ H.T, tau)
    if sol.feasible:
        _, residual = primal_kkt(H, taus, sol.mu)
        assert residual < 1e-8
        assert kkt_residual(H @ H.T, tau, sol.mu) < 1e-8
        if tau > 1e-6:  # (below, an incompatibility is within the tolerance on the constraints)
            assert farkas_certificate(H, taus) < 1e-7
    else:  # Cor. B.3: only with tau > 0 and at least two secondaries; then an LP proves it
        assert tau > 0 and k >= 3 and (sol.mu == 0).all()
        if tau > 1e-6:  # (a subnormal tau, 2e-309 found by hypothesis: incompatible within the tolerance)
            assert farkas_certificate(H, taus) > 1e-7


@pytest.mark.parametrize("k", [3, 4, 5, 6])
@pytest.mark.parametrize("seed", range(6))
def test_the_solution_is_the_one_of_an_independent_enumeration(k, seed):
    H = structured(k, 8, "conflict", seed)
    taus = torch.rand(k - 1, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.6
    sol = pcd_multipliers(H @ H.T, taus)
    reference = enumerate_kkt(H, taus)
    assert sol.feasible and reference is not None
    torch.testing.assert_close(H[0] + sol.mu @ H[1:], reference, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("k", "d"), [(100, 30), (100, 150), (60, 8)])
def test_many_objectives_rank_deficient_or_not(k, d):
    H = structured(k, d, "conflict", k + d)
    H = H / H.norm(dim=1, keepdim=True)
    for tau in (0.0, 0.2):
        taus = torch.full((k - 1,), tau, dtype=F64)
        sol = pcd_multipliers(H @ H.T, tau)
        if sol.feasible:
            assert primal_kkt(H, taus, sol.mu)[1] < 1e-8
            assert len(sol.active) <= min(d, k - 1)
        else:
            assert farkas_certificate(H, taus) > 1e-7


def test_a_secondary_with_a_small_normalised_gradient_keeps_its_guarantee():
    # TorchJD counts a constraint as met when violated by less than 1e-9 times the largest
    # normalised squared norm; here the tolerance is relative to the constraint's own terms.
    H = torch.tensor([[1.0, 0.0], [0.0, 1e-5]], dtype=F64)
    sol = pcd_multipliers(H @ H.T, 0.5)
    d = H[0] + sol.mu @ H[1:]
    assert H[1] @ d >= 0.5 * (H[1] @ H[1]) * (1 - 1e-12)
    torch.testing.assert_close(sol.mu, torch.tensor([0.5], dtype=F64))


def test_the_iteration_cap_warns_instead_of_passing_silently():
    H = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=F64)  # needs two additions
    assert pcd_multipliers(H @ H.T, 0.5).converged
    with pytest.warns(RuntimeWarning, match="stopped after 1 steps"):
        sol = pcd_multipliers(H @ H.T, 0.5, max_iter=1)
    assert not sol.converged


# -- special cases --------------------------------------------------------------------------------------


def test_one_task_is_its_own_gradient_and_a_zero_primary_gives_no_step():
    J = torch.tensor([[3.0, 4.0]], dtype=F64)
    torch.testing.assert_close(call(method_for(1), J @ J.T), torch.ones(1, dtype=F64))
    J = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-3.0, 1.0]], dtype=F64)
    method = method_for(3)
    assert (call(method, J @ J.T) == 0).all()
    torch.testing.assert_close(method.sq_norm_ema, 1e-3 * (J * J).sum(1))  # still observed


def test_the_primary_gradient_when_no_constraint_binds():
    J = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=F64)
    w = call(method_for(3, tau=0.5), J @ J.T)
    assert w.tolist() == [1.0, 0.0, 0.0]


def test_incompatible_secondaries_fall_back_to_the_primary():
    J = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, -2.0]], dtype=F64)  # anti-parallel secondaries
    method = method_for(3)
    assert call(method, J @ J.T).tolist() == [1.0, 0.0, 0.0]
    assert method.step_extras()["feasible"] is False
    # with tau = 0 they are compatible: d must be orthogonal to both, so d~ = (1, 0)
    w = call(method_for(3, tau=0.0), J @ J.T)
    torch.testing.assert_close(J.T @ w, torch.tensor([math.sqrt(2), 0.0], dtype=F64), atol=1e-12, rtol=0)


def test_an_opposed_secondary_reverses_the_step_at_the_primary_norm():
    J = torch.tensor([[1.0, 0.0], [-3.0, 0.0]], dtype=F64)
    w = call(method_for(2, tau=0.02), J @ J.T)
    torch.testing.assert_close(J.T @ w, torch.tensor([-1.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    # tau = 0: the only compatible direction is d~ = 0, so no step (not rescaled rounding noise)
    assert (call(method_for(2, tau=0.0), J @ J.T) == 0).all()


def test_zero_and_duplicated_secondaries():
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(3, 5, generator=gen, dtype=F64)
    J[1:] -= J[0]
    for eps in (1e-8, 0.0):  # a zero gradient's scale is 1e4 or (EMA 0, eps 0) set to 0
        base = call(method_for(3, tau=0.3, eps=eps), J @ J.T)
        Jz = torch.cat([J, torch.zeros(1, 5, dtype=F64)])
        with_zero = call(method_for(4, tau=0.3, eps=eps), Jz @ Jz.T)
        assert with_zero[3] == 0
        torch.testing.assert_close(with_zero[:3], base, atol=1e-12, rtol=0)
    # a secondary twice and another at 4x scale: the same normalised constraints (eps = 0)
    dup = torch.cat([J, J[1:2], 4.0 * J[2:3]])
    w = call(method_for(5, tau=0.3, eps=0.0), dup @ dup.T)
    torch.testing.assert_close(dup.T @ w, J.T @ base, atol=1e-10, rtol=0)


@given(
    logs=st.lists(st.floats(-8, 8), min_size=2, max_size=6),
    tau=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=40, deadline=None)
def test_scale_free_first_step_and_finite_weights_at_any_scale(logs, tau, seed):
    k = len(logs)
    J = structured(k, 7, "conflict", seed)
    c = torch.tensor([10.0**x for x in logs], dtype=F64)
    w = call(method_for(k, tau=tau, eps=0.0), J @ J.T)
    w_scaled = call(method_for(k, tau=tau, eps=0.0), (c[:, None] * J) @ (c[:, None] * J).T)
    # d' = c_1 d: the normalisation removes every row's scale, the rescale restores ||g_1||
    torch.testing.assert_close(
        (c[:, None] * J).T @ w_scaled, c[0] * (J.T @ w), atol=1e-9 * float(c[0] * J[0].norm()), rtol=0
    )
    w_eps = call(method_for(k, tau=tau), (c[:, None] * J) @ (c[:, None] * J).T)  # eps = 1e-8
    assert torch.isfinite(w_eps).all()
    d = (c[:, None] * J).T @ w_eps
    assert abs(float(d.norm()) / float(c[0] * J[0].norm()) - 1) < 1e-9 or float(d.norm()) == 0


@given(k=st.integers(3, 7), tau=st.floats(0, 1), seed=st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_secondaries_are_interchangeable(k, tau, seed):
    J = structured(k, 6, "conflict", seed)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(k - 1)])
    w = call(method_for(k, tau=tau), J @ J.T)
    Jp = J[perm]
    wp = call(method_for(k, tau=tau), Jp @ Jp.T)
    torch.testing.assert_close(Jp.T @ wp, J.T @ w, atol=1e-9, rtol=0)


# -- the normalisation and the options -------------------------------------------------------------------


def test_the_ema_is_bias_corrected_and_per_task():
    beta, tau = 0.9, 0.3
    gen = torch.Generator().manual_seed(0)
    J1, J2 = torch.randn(3, 6, generator=gen, dtype=F64), 10 * torch.randn(3, 6, generator=gen, dtype=F64)
    method = method_for(3, tau=tau, beta=beta, eps=0.0)
    call(method, J1 @ J1.T)
    w = call(method, J2 @ J2.T)
    ema = beta * (1 - beta) * (J1 * J1).sum(1) + (1 - beta) * (J2 * J2).sum(1)
    expected, _ = pcd_weights(J2 @ J2.T, tau, 1 / (ema / (1 - beta**2)).sqrt())
    torch.testing.assert_close(w, expected, atol=1e-12, rtol=1e-12)
    # a step without t1: its average and count stand still, the others' move on
    method.active_index = torch.tensor([0, 2])
    sub = J1[[0, 2]]
    call(method, sub @ sub.T)
    assert method.ema_steps.tolist() == [3, 2, 3]
    torch.testing.assert_close(method.sq_norm_ema[1], ema[1])


def test_primary_and_tau_options():
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(3, 5, generator=gen, dtype=F64)
    J[[0, 2]] -= J[1]
    order = [1, 0, 2]
    Jp = J[order]
    w = call(method_for(3, primary="t1", tau=[0.1, 0.6]), J @ J.T)
    expected = call(method_for(3, tau=[0.1, 0.6]), Jp @ Jp.T)
    torch.testing.assert_close(w[order], expected, atol=1e-12, rtol=0)
    by_name = call(method_for(3, primary="t1", tau={"t2": 0.6, "t0": 0.1}), J @ J.T)
    torch.testing.assert_close(by_name, w, atol=0, rtol=0)
    torch.testing.assert_close(
        call(method_for(3, tau=[0.3, 0.3]), J @ J.T), call(method_for(3, tau=0.3), J @ J.T), atol=0, rtol=0
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tau": [0.1]}, "1 tau values for 2"),
        ({"primary": "t9"}, "primary must be one of"),
        ({"tau": {"t1": 0.1}}, "every secondary"),
        ({"tau": {"t0": 0.1, "t1": 0.1, "t2": 0.1}}, "nothing else"),
    ],
)
def test_inconsistent_options_are_refused_at_setup(options, match):
    with pytest.raises(ConfigError, match=match):
        method_for(3, **options)


@pytest.mark.parametrize("options", [{"tau": 1.5}, {"tau": [0.1, -0.1]}, {"beta": 1.0}, {"eps": -1.0}])
def test_out_of_range_values_are_refused(options):
    with pytest.raises(ConfigError, match="must be"):
        PCD(**options)


# -- agreement with TorchJD 0.18 ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "conflict", "duplicates", "zeros"])
def test_agrees_with_torchjd_over_a_sequence_of_steps(kind):
    aggregation = pytest.importorskip("torchjd.aggregation")
    for k, tau in [(2, 0.02), (3, 0.3), (5, 0.0), (8, [0.1, 0.2, 0.0, 0.5, 0.02, 0.9, 0.3])]:
        ours = method_for(k, tau=tau, beta=0.9)
        theirs = aggregation.PCDWeighting(
            tau=torch.tensor(tau, dtype=F64) if isinstance(tau, list) else tau, beta=0.9
        )
        for step in range(6):
            J = structured(k, 6, kind, 100 * k + step) * (1 + step)
            G = J @ J.T
            w, ref = call(ours, G), theirs(G)
            scale = float(J[0].norm()) + 1e-300
            torch.testing.assert_close(J.T @ w / scale, J.T @ ref / scale, atol=1e-9, rtol=0)


def test_agrees_with_torchjd_with_many_objectives():
    aggregation = pytest.importorskip("torchjd.aggregation")
    for k, d in [(30, 10), (50, 80)]:
        J = structured(k, d, "conflict", k)
        w = call(method_for(k, tau=0.1), J @ J.T)
        ref = aggregation.PCDWeighting(tau=0.1)(J @ J.T)
        torch.testing.assert_close(J.T @ w, J.T @ ref, atol=1e-9 * float(J[0].norm()), rtol=0)


# -- through the method contract -------------------------------------------------------------------------


def test_backward_writes_the_normalised_projection_at_the_primary_norm():
    tasks, net, x, y = make_problem(k=3)
    J, heads, _ = brute_force(net, tasks, x, y)
    method = mk.methods.create("pcd", tau=0.4)
    info = method.backward(tasks.losses(net(x), y), net)
    # reference from the gradients themselves: normalise, project by enumeration, rescale
    H = first_step_scales(J)[:, None] * J
    reference = enumerate_kkt(H, torch.full((2,), 0.4, dtype=F64))
    expected = reference * J[0].norm() / reference.norm()
    torch.testing.assert_close(shared_grad(net), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(shared_grad(net), J.T @ info.weights, atol=1e-10, rtol=0)
    for k, t in enumerate(tasks.names):  # heads: the same combination (the official code's)
        for p, own in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, info.weights[k] * own, atol=1e-12, rtol=0)
    assert info.extras["feasible"] and info.extras["kkt_residual"] < 1e-12


def test_a_primary_without_labels_gives_no_shared_step():
    tasks, net, x, y = make_problem(k=3)
    y = dict(y)
    y["t0"] = torch.full_like(y["t0"], float("nan"))
    method = mk.methods.create("pcd")
    info = method.backward(tasks.losses(net(x), y), net)
    assert (info.weights == 0).all()
    assert all(p.grad is None or not p.grad.abs().sum() for p in net.shared_parameters())
    assert method.ema_steps.tolist() == [0, 1, 1]


def test_representation_level_and_own_heads():
    tasks, net, x, y = make_problem(k=3)
    _, heads, H = brute_force(net, tasks, x, y)
    method = mk.methods.create("pcd", level="representation", head_grad="own")
    out = net(x, full_output=True)
    info = method.backward(tasks.losses(out.predictions, y), net, out)
    Hn = first_step_scales(H)[:, None] * H
    reference = enumerate_kkt(Hn, torch.full((2,), 0.02, dtype=F64))
    torch.testing.assert_close(
        H.T @ info.weights, reference * H[0].norm() / reference.norm(), atol=1e-10, rtol=0
    )
    for k, t in enumerate(tasks.names):
        for p, own in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, own, atol=1e-12, rtol=0)


def test_no_warning_on_an_ordinary_run():
    tasks, net, x, y = make_problem(k=4)
    method = mk.methods.create("pcd")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            info = method.backward(tasks.losses(net(x), y), net)
            assert info.extras["converged"] and torch.isfinite(info.weights).all()
            opt.step()
    assert method.ema_steps.tolist() == [5, 5, 5, 5]
