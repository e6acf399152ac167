"""MoCo: the tracking recurrence, the lambda step (projection or softmax), its limit (MGDA),
the scale, the raw-loss mode, missing labels and an exact resume."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.errors import NonPositiveLossError
from mtlkit.methods.min_norm import kkt_violation, min_norm_weights, project_simplex
from mtlkit.methods.moco import MoCo
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import linear_step, shared_grad


def bisection_projection(v):
    """The simplex projection max(v - tau, 0) with tau found by bisection (another algorithm)."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(80):
        tau = (lo + hi) / 2
        if float((v - tau).clamp_min(0).sum()) > 1:
            lo = tau
        else:
            hi = tau
    return (v - (lo + hi) / 2).clamp_min(0)


class Reference:
    """The official NYUv2 ``tracking`` update (LibMTL's with ``softmax``, ``raw_loss``, ``factor=1``)."""

    def __init__(self, k, d, beta=0.1, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, **kw):
        self.y, self.t = torch.zeros(k, d, dtype=torch.float64), 0
        self.lam = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma = beta, beta_sigma, gamma, gamma_sigma
        self.rho = rho
        self.update, self.raw, self.factor = (
            kw.get("update", "project"),
            kw.get("raw", False),
            kw.get("factor", k),
        )

    def step(self, J, L):
        if self.raw:
            J = J / (J.norm(dim=1, keepdim=True) + 1e-8) * L[:, None]
        beta_t = self.beta / (1 + self.t) ** self.beta_sigma
        gamma_t = self.gamma / (1 + self.t) ** self.gamma_sigma
        self.y = self.y - beta_t * (self.y - J)
        G = self.y @ self.y.T + self.rho * torch.eye(len(self.y), dtype=torch.float64)
        v = self.lam - gamma_t * G @ self.lam
        self.lam = bisection_projection(v) if self.update == "project" else torch.softmax(v, 0)
        self.t += 1
        return self.factor * self.y.T @ self.lam


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 100), seed=st.integers(0, 10**6), spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_the_simplex_projection_is_exact(k, seed, spread):
    v = torch.randn(k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * spread
    p = project_simplex(v)
    assert (p >= 0).all() and float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(p, bisection_projection(v), atol=1e-12 * max(1.0, spread), rtol=0)
    torch.testing.assert_close(project_simplex(p), p, atol=1e-15, rtol=0)  # a point of the simplex stays


@pytest.mark.parametrize(
    "options, ref",
    [
        ({}, {}),
        (
            {"lambda_update": "softmax", "raw_loss": True, "scale": 1.0, "beta": 0.5, "rho": 0.3},
            {"update": "softmax", "raw": True, "factor": 1.0, "beta": 0.5, "rho": 0.3},
        ),
    ],
    ids=["official", "libmtl"],
)
def test_end_to_end_matches_the_reference_update_through_backward(options, ref):
    torch.manual_seed(1)
    tasks, net, x0, y0 = make_problem(k=3)
    method = mk.methods.create("moco", **options)
    reference = None
    for _ in range(4):
        x = torch.randn_like(x0)
        y = {k: torch.randn_like(v) for k, v in y0.items()}
        J, heads, _ = brute_force(net, tasks, x, y)
        reference = reference or Reference(3, J.shape[1], **ref)
        losses = tasks.losses(net(x), y)
        d = reference.step(J, torch.stack([v.detach() for v in losses.values()]))
        net.zero_grad(set_to_none=True)
        info = method.backward(losses, net)
        torch.testing.assert_close(shared_grad(net), d, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(info.extras["lambda"], reference.lam, atol=1e-14, rtol=0)
        torch.testing.assert_close(method.tracking, reference.y, atol=1e-14, rtol=1e-12)
        for k, name in enumerate(tasks.names):  # heads: their own gradient
            for p, g in zip(net.task_parameters()[name], heads[k], strict=True):
                torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-10)
        assert info.weights is None


def test_tracking_is_the_closed_form_ema_with_decaying_rates():
    # (g) 1: Y_3 = sum_s beta_s prod_{r > s} (1 - beta_r) g_s, beta_t = beta / (1 + t)^sigma
    gen = torch.Generator().manual_seed(2)
    method = MoCo(beta=0.6, beta_sigma=0.5)
    gs = [torch.randn(3, 4, dtype=torch.float64, generator=gen) for _ in range(3)]
    for g in gs:
        linear_step(method, g)
    b = [0.6 / (1 + t) ** 0.5 for t in range(3)]
    closed = b[0] * (1 - b[1]) * (1 - b[2]) * gs[0] + b[1] * (1 - b[2]) * gs[1] + b[2] * gs[2]
    torch.testing.assert_close(method.tracking, closed, atol=1e-15, rtol=1e-13)
    assert method._family_state() == {"updates": 3}


@pytest.mark.parametrize("k, d", [(3, 6), (4, 2), (5, 5)])
def test_the_projected_lambda_converges_to_the_mgda_weights(k, d):
    # (g) 2: beta = 1 (Y = J), a constant small gamma: projected gradient on min ||J^T lambda||^2
    gen = torch.Generator().manual_seed(k + d)
    C = torch.randn(k, d, dtype=torch.float64, generator=gen)
    G = C @ C.T
    gamma = 1.0 / float(torch.linalg.eigvalsh(G).max())
    method = MoCo(beta=1.0, beta_sigma=0.0, gamma=gamma, gamma_sigma=0.0)
    for _ in range(200):
        d_step, info = linear_step(method, C)
    lam = info.extras["lambda"]
    w = min_norm_weights(G)
    assert kkt_violation(G, lam) < 1e-6  # the spec asks 1e-4
    torch.testing.assert_close(d_step, k * C.T @ lam, atol=1e-13, rtol=0)
    torch.testing.assert_close((C.T @ lam).norm(), (C.T @ w).norm(), atol=1e-6, rtol=0)


def test_the_softmax_lambda_stays_positive_and_uniform_for_identical_tasks():
    # (g) 3
    gen = torch.Generator().manual_seed(3)
    method = MoCo(lambda_update="softmax", gamma=50.0, gamma_sigma=0.0)
    g = torch.randn(1, 5, dtype=torch.float64, generator=gen)
    for _ in range(5):
        linear_step(method, torch.cat([g, g, 10 * torch.randn(1, 5, dtype=torch.float64, generator=gen)]))
        lam = method.lambdas
        assert (lam > 0).all() and lam[0] == lam[1]
    twins = MoCo(lambda_update="softmax")
    for _ in range(3):
        _, info = linear_step(twins, torch.cat([g, g]))
        torch.testing.assert_close(info.extras["lambda"], torch.full((2,), 0.5, dtype=torch.float64))
    projected = MoCo(gamma=50.0, gamma_sigma=0.0)  # the projection can reach a vertex
    for _ in range(5):
        linear_step(projected, torch.cat([g, g, 10 * torch.randn(1, 5, dtype=torch.float64, generator=gen)]))
    assert (projected.lambdas == 0).any()


def test_one_task_is_gradient_momentum_and_opposite_tasks_cancel():
    g = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    method = MoCo(beta=0.5, beta_sigma=0.0)
    d1, _ = linear_step(method, g)
    d2, info = linear_step(method, 3 * g)
    torch.testing.assert_close(d1, 0.5 * g[0], atol=0, rtol=0)
    torch.testing.assert_close(d2, 0.5 * d1 + 0.5 * 3 * g[0], atol=1e-15, rtol=0)
    assert float(info.extras["lambda"]) == 1.0
    opposite = MoCo(beta=1.0, gamma=0.1)
    d, info = linear_step(opposite, torch.cat([g, -g]))
    torch.testing.assert_close(d, torch.zeros(3, dtype=torch.float64), atol=1e-15, rtol=0)


def test_the_scale_is_k_or_the_given_number():
    C = torch.randn(3, 4, dtype=torch.float64)
    d_k, _ = linear_step(MoCo(), C)
    d_1, _ = linear_step(MoCo(scale=1.0), C)
    d_2, _ = linear_step(MoCo(scale=2.5), C)
    torch.testing.assert_close(d_k, 3 * d_1, atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(d_2, 2.5 * d_1, atol=1e-15, rtol=1e-14)


def test_raw_loss_tracks_loss_scaled_unit_gradients_and_refuses_negative_losses():
    C = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    method = MoCo(raw_loss=True, beta=1.0)
    linear_step(method, C, torch.tensor([2.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(
        method.tracking, torch.tensor([[1.2, 1.6], [0.0, 0.0]], dtype=torch.float64), atol=1e-8, rtol=0
    )
    state = copy.deepcopy(method.state_dict())
    with pytest.raises(NonPositiveLossError, match="t1"):
        linear_step(method, C, torch.tensor([2.0, -1.0], dtype=torch.float64))
    assert torch.equal(method.tracking, state["tracking"]) and method.updates == 1
    linear_step(MoCo(), C, torch.tensor([2.0, -1.0], dtype=torch.float64))  # plain MoCo takes any loss


def test_a_task_without_labels_keeps_its_row_and_lambda():
    gen = torch.Generator().manual_seed(4)
    method = MoCo(gamma=0.5)
    linear_step(method, torch.randn(3, 4, dtype=torch.float64, generator=gen))
    before_y, before_lam = method.tracking.clone(), method.lambdas.clone()
    C = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    d, info = linear_step(method, C, labelled=[3, 0, 3])
    assert torch.equal(method.tracking[1], before_y[1]) and method.lambdas[1] == before_lam[1]
    assert torch.equal(info.extras["lambda"], method.lambdas)
    assert float(method.lambdas.sum()) == pytest.approx(1.0, abs=1e-15)
    # the step solves the two-task problem with their lambdas renormalised, scaled by 2 tasks
    beta_t, gamma_t = 0.1 / 2**0.5, 0.5 / 2**0.5
    Y = before_y[[0, 2]] - beta_t * (before_y[[0, 2]] - C[[0, 2]])
    held = before_lam[[0, 2]]
    lam = held / held.sum()
    new = bisection_projection(lam - gamma_t * (Y @ Y.T) @ lam)
    torch.testing.assert_close(method.tracking[[0, 2]], Y, atol=1e-15, rtol=0)
    torch.testing.assert_close(method.lambdas[[0, 2]], held.sum() * new, atol=1e-14, rtol=0)
    torch.testing.assert_close(d, 2 * Y.T @ new, atol=1e-14, rtol=0)


def test_a_resumed_run_is_bit_identical():
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 6, dtype=torch.float64, generator=gen) for _ in range(6)]
    full = MoCo(beta_sigma=0.5, gamma_sigma=0.5)
    out_full = [linear_step(full, C)[0] for C in batches]
    first = MoCo(beta_sigma=0.5, gamma_sigma=0.5)
    for C in batches[:3]:
        linear_step(first, C)
    resumed = MoCo(beta_sigma=0.5, gamma_sigma=0.5)
    resumed.setup(["t0", "t1", "t2"])
    assert resumed.tracking.shape == (3, 0)
    resumed.load_state_dict(first.state_dict())
    out_resumed = [linear_step(resumed, C)[0] for C in batches[3:]]
    for a, b in zip(out_full[3:], out_resumed, strict=True):
        assert torch.equal(a, b)
    assert repr(full.state_dict()) == repr(resumed.state_dict())


@settings(max_examples=25, deadline=None)
@given(exponent=st.integers(-8, 8), perm=st.permutations([0, 1, 2]))
def test_extreme_scales_stay_finite_and_task_order_does_not_matter(exponent, perm):
    gen = torch.Generator().manual_seed(6)
    p = list(perm)
    plain, permuted = MoCo(), MoCo()
    for _ in range(3):
        C = torch.randn(3, 4, dtype=torch.float64, generator=gen) * 10.0**exponent
        d, info = linear_step(plain, C)
        d_p, info_p = linear_step(permuted, C[p])
        assert torch.isfinite(d).all() and torch.isfinite(info.extras["lambda"]).all()
        torch.testing.assert_close(info_p.extras["lambda"], info.extras["lambda"][p], atol=1e-12, rtol=0)
        torch.testing.assert_close(d_p, d, atol=1e-12 * float(d.abs().max()), rtol=1e-10)
