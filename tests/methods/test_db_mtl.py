"""DB-MTL: log-loss gradients, their EMA, the max-norm balancing, heads on the log loss, state."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.errors import EngineError, NonPositiveLossError
from mtlkit.methods.db_mtl import DBMTL
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods import helpers
from tests.methods.helpers import shared_grad

EPS = 1e-8


def linear_step(method, C, b, labelled=None):
    """The shared gradient of one step with task gradients C_k and losses b_k."""
    return helpers.linear_step(method, C, b, labelled)[0]


def reference_direction(H):
    norms = H.norm(dim=1)
    return ((norms.max() / (norms + EPS))[:, None] * H).sum(0)


def test_end_to_end_matches_the_brute_force_ema_and_log_loss_heads():
    tasks, net, x0, y0 = make_problem(k=3)
    method = mk.methods.create("db_mtl", beta=0.8, beta_sigma=0.5)
    H = None
    for t in range(1, 4):
        x = torch.randn_like(x0)
        y = {k: torch.randn_like(v) for k, v in y0.items()}
        J, heads, _ = brute_force(net, tasks, x, y)
        losses = tasks.losses(net(x), y)
        L = torch.stack([v.detach() for v in losses.values()])
        h = J / (L + EPS)[:, None]
        beta_t = 0.8 / t**0.5
        H = (1 - beta_t) * h if H is None else beta_t * H + (1 - beta_t) * h
        net.zero_grad(set_to_none=True)
        info = method.backward(losses, net)
        torch.testing.assert_close(shared_grad(net), reference_direction(H), atol=1e-12, rtol=1e-10)
        for k, name in enumerate(tasks.names):  # heads: the gradient of log(L_k + eps)
            for p, ref in zip(net.task_parameters()[name], heads[k], strict=True):
                torch.testing.assert_close(p.grad, ref / (L[k] + EPS), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(method.ema, H, atol=1e-13, rtol=1e-12)
        assert info.weights is None
        torch.testing.assert_close(info.grad_norms, J.norm(dim=1), atol=1e-12, rtol=1e-10)


def test_multiplying_a_loss_by_a_constant_changes_nothing():
    # (g) 1: the log turns a factor into an additive constant; a version without the log fails
    tasks, net, x, y = make_problem(k=3)
    nets = [net, copy.deepcopy(net)]
    methods = [mk.methods.create("db_mtl"), mk.methods.create("db_mtl")]
    for _ in range(3):
        grads = []
        for i, (n, m) in enumerate(zip(nets, methods, strict=True)):
            n.zero_grad(set_to_none=True)
            losses = tasks.losses(n(x), y)
            if i == 1:
                losses = {k: v * (100.0 if k == "t0" else 1.0) for k, v in losses.items()}
            m.backward(losses, n)
            grads.append([p.grad.clone() for p in n.parameters()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-7)  # the 1e-8 in log(L + 1e-8)
        for n in nets:
            with torch.no_grad():
                for p in n.parameters():
                    p -= 0.05 * p.grad


def test_beta_zero_gives_equal_norm_terms_of_the_largest_log_gradient_norm():
    # (g) 2: d = max_j ||h_j|| * sum_k h_k / ||h_k|| (up to the 1e-8 in the ratio)
    gen = torch.Generator().manual_seed(1)
    C = torch.randn(4, 7, dtype=torch.float64, generator=gen) * torch.tensor([[1.0], [30.0], [0.01], [5.0]])
    b = torch.tensor([0.3, 2.0, 0.05, 7.0], dtype=torch.float64)
    d = linear_step(DBMTL(beta=0.0), C, b)
    h = C / (b + EPS)[:, None]
    closed = h.norm(dim=1).max() * (h / h.norm(dim=1, keepdim=True)).sum(0)
    torch.testing.assert_close(d, closed, atol=1e-7 * float(closed.norm()), rtol=0)
    torch.testing.assert_close(d, reference_direction(h), atol=0, rtol=1e-13)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_the_ema_follows_its_closed_form_without_bias_correction(sigma):
    # (g) 3: H_3 = sum_s (1 - beta_s) prod_{r > s} beta_r h_s
    gen = torch.Generator().manual_seed(2)
    method = DBMTL(beta=0.9, beta_sigma=sigma)
    hs, betas = [], []
    for t in range(1, 4):
        C = torch.randn(3, 5, dtype=torch.float64, generator=gen)
        b = torch.rand(3, dtype=torch.float64, generator=gen) + 0.1
        linear_step(method, C, b)
        hs.append(C / (b + EPS)[:, None])
        betas.append(0.9 / t**sigma)
    b1, b2, b3 = betas
    closed = (1 - b1) * b2 * b3 * hs[0] + (1 - b2) * b3 * hs[1] + (1 - b3) * hs[2]
    torch.testing.assert_close(method.ema, closed, atol=1e-15, rtol=1e-13)
    assert method._family_state() == {"updates": 3}


@settings(max_examples=40, deadline=None)
@given(
    exponents=st.lists(st.integers(0, 8), min_size=3, max_size=3),
    perm=st.permutations([0, 1, 2]),
)
def test_loss_scale_invariance_and_permutation_equivariance(exponents, perm):
    # multiplying task losses by 10^s (s in [0, 8]) changes nothing, and neither does reordering
    # the tasks (the direction is symmetric in them); below 1 the 1e-8 of log(L + 1e-8) shows
    gen = torch.Generator().manual_seed(3)
    C = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    b = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    c = torch.tensor([10.0**e for e in exponents], dtype=torch.float64)
    p = list(perm)
    plain, scaled = DBMTL(), DBMTL()
    for step in range(2):
        Ct, bt = C * (1 + step), b * (1 + step)
        d0 = linear_step(plain, Ct, bt)
        d1 = linear_step(scaled, (Ct * c[:, None])[p], (bt * c)[p])
        torch.testing.assert_close(d1, d0, atol=1e-14, rtol=1e-7)


@settings(max_examples=30, deadline=None)
@given(exponents=st.lists(st.integers(-8, 8), min_size=3, max_size=3), loss=st.integers(-8, 8))
def test_gradient_and_loss_scales_from_1e_minus_8_to_1e8_stay_finite(exponents, loss):
    gen = torch.Generator().manual_seed(5)
    C = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    C = C * torch.tensor([10.0**e for e in exponents], dtype=torch.float64)[:, None]
    b = torch.full((3,), 10.0**loss, dtype=torch.float64)
    method = DBMTL()
    for _ in range(2):
        d = linear_step(method, C, b)
        assert torch.isfinite(d).all() and torch.isfinite(method.ema).all()
    torch.testing.assert_close(d, reference_direction(method.ema), atol=0, rtol=1e-12)


def test_a_negative_loss_is_refused_before_anything_changes_and_zero_is_fine():
    method = DBMTL()
    C = torch.ones(2, 3, dtype=torch.float64)
    linear_step(method, C, torch.tensor([1.0, 2.0], dtype=torch.float64))
    before = method.state_dict()
    with pytest.raises(NonPositiveLossError, match="t1"):
        linear_step(method, C, torch.tensor([1.0, -0.5], dtype=torch.float64))
    assert torch.equal(method.ema, before["ema"]) and method.updates == 1
    # L = 0 with a zero gradient (a solved task): h = 0, finite update
    zero = torch.zeros(2, 3, dtype=torch.float64)
    zero[0] = 1.0
    d = linear_step(method, zero, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.isfinite(d).all()


def test_a_zero_gradient_contributes_nothing_and_one_task_is_its_ema():
    C = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    d = linear_step(DBMTL(beta=0.0), C, torch.tensor([2.0, 1.0], dtype=torch.float64))
    h0 = C[0] / (2 + EPS)
    torch.testing.assert_close(d, h0 * h0.norm() / (h0.norm() + EPS), atol=1e-15, rtol=1e-14)
    single = DBMTL(beta=0.5)
    d = linear_step(single, C[:1], torch.tensor([2.0], dtype=torch.float64))
    H = 0.5 * C[0] / (2 + EPS)
    torch.testing.assert_close(d, H * (H.norm() / (H.norm() + EPS)), atol=0, rtol=1e-15)


def test_a_task_without_labels_keeps_its_ema_row_and_is_left_out():
    gen = torch.Generator().manual_seed(4)
    method = DBMTL(beta=0.5)
    C = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    linear_step(method, C, b)
    first = method.ema.clone()
    d = linear_step(method, 2 * C, b, labelled=[4, 0, 4])
    assert torch.equal(method.ema[1], first[1])
    H = 0.5 * first[[0, 2]] + 0.5 * (2 * C[[0, 2]] / (b[[0, 2], None] + EPS))
    torch.testing.assert_close(method.ema[[0, 2]], H, atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(d, reference_direction(H), atol=1e-15, rtol=1e-13)


def test_the_lazily_sized_state_loads_before_the_first_step_and_refuses_another_model():
    C = torch.randn(2, 5, dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    stepped = DBMTL()
    linear_step(stepped, C, b)
    fresh = DBMTL()
    fresh.setup(["t0", "t1"])
    assert fresh.ema.shape == (2, 0)
    fresh.load_state_dict(stepped.state_dict())  # K x 0 placeholder takes the saved width
    assert fresh.ema.shape == (2, 5) and torch.equal(fresh.ema, stepped.ema)
    torch.testing.assert_close(linear_step(fresh, C, b), linear_step(stepped, C, b), atol=0, rtol=0)
    unstepped = DBMTL()
    unstepped.setup(["t0", "t1"])
    stepped.load_state_dict(unstepped.state_dict())  # and back to "no step taken yet"
    assert stepped.ema.shape == (2, 0) and stepped.updates == 0
    linear_step(stepped, C, b)
    with pytest.raises(EngineError, match="5 shared parameter entries"):
        linear_step(stepped, torch.ones(2, 3, dtype=torch.float64), b)


def test_beta_must_be_below_one():
    with pytest.raises(mk.errors.ConfigError, match="beta"):
        DBMTL(beta=1.0)
