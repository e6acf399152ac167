"""PCGrad: the K = 2 closed form, the textbook loop on J with the same orders, the seed and its
resume, scale invariance, the self-projection option and degenerate gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.methods.pcgrad import TINY, PCGrad, pcgrad_coefficients, random_orders
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad

F64 = torch.float64


def textbook(J, orders, skip_self=True):
    """The rows p_i of the paper's loop, on the gradient vectors themselves."""
    sq = (J * J).sum(1)
    rows = []
    for i in range(len(J)):
        p = J[i].clone()
        for j in orders[i].tolist():
            if (skip_self and j == i) or sq[j] <= TINY * sq.max():
                continue
            ip = p @ J[j]
            if ip < 0:
                p = p - ip / sq[j] * J[j]
        rows.append(p)
    return torch.stack(rows)


def orders_of(seed, k, draws=1):
    gen = torch.Generator().manual_seed(seed)
    return [random_orders(k, gen) for _ in range(draws)]


def pcgrad(k, **options):
    method = PCGrad(**options)
    method.setup([f"t{i}" for i in range(k)])
    return method


def weights(method, J):
    return method.weights(J @ J.T, torch.ones(len(J), dtype=F64))


def test_two_conflicting_tasks_give_the_closed_form_for_any_seed():
    g1 = torch.tensor([1.0, 0.3, -0.5], dtype=F64)
    g2 = torch.tensor([-0.7, 1.0, 0.2], dtype=F64)
    c = g1 @ g2
    assert c < 0
    J = torch.stack([g1, g2])
    expected = g1 + g2 - c * (g1 / (g1 @ g1) + g2 / (g2 @ g2))
    for seed in range(4):
        for skip_self in (True, False):
            w = weights(pcgrad(2, seed=seed, skip_self=skip_self), J)
            torch.testing.assert_close(J.T @ w, expected, atol=1e-14, rtol=0)
    C = pcgrad_coefficients(J @ J.T, orders_of(0, 2)[0])
    p = C @ J
    assert abs(p[0] @ g2) < 1e-14 and abs(p[1] @ g1) < 1e-14  # each is orthogonal to the other task


@given(seed=st.integers(0, 10_000), k=st.integers(2, 8), gen_seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_without_conflicts_the_weights_are_all_ones_for_any_seed(seed, k, gen_seed):
    J = torch.rand(k, 6, generator=torch.Generator().manual_seed(gen_seed), dtype=F64)  # >= 0: no conflict
    J[0, 0] = -0.01  # negative entries, yet every pair still has <g_i, g_j> >= 0 ...
    assert ((J @ J.T) >= 0).all()
    for skip_self in (True, False):
        torch.testing.assert_close(
            weights(pcgrad(k, seed=seed, skip_self=skip_self), J), torch.ones(k, dtype=F64)
        )
    torch.testing.assert_close(
        weights(pcgrad(k, seed=seed, reduction="mean"), J), torch.full((k,), 1 / k, dtype=F64)
    )


@given(
    k=st.integers(1, 10),
    d=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    skip_self=st.booleans(),
    degenerate=st.sampled_from(["none", "zero", "duplicate", "opposite"]),
)
@settings(max_examples=80, deadline=None)
def test_the_gramian_form_is_the_textbook_loop_with_the_same_orders(k, d, seed, skip_self, degenerate):
    J = torch.randn(k, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    if k >= 3 and degenerate == "zero":
        J[1] = 0.0
    elif k >= 3 and degenerate == "duplicate":
        J[2] = J[0]
    elif k >= 3 and degenerate == "opposite":
        J[2] = -2.0 * J[0]
    (orders,) = orders_of(seed, k)
    P = textbook(J, orders, skip_self)
    C = pcgrad_coefficients(J @ J.T, orders, skip_self=skip_self)
    scale = float(J.norm(dim=1).max()) + 1e-300
    torch.testing.assert_close(C @ J, P, atol=1e-10 * scale, rtol=0)
    w = weights(pcgrad(k, seed=seed, skip_self=skip_self), J)  # the method draws these very orders
    torch.testing.assert_close(w, C.sum(0), atol=0, rtol=0)
    torch.testing.assert_close(J.T @ w, P.sum(0), atol=1e-10 * k * scale, rtol=0)


def test_many_tasks_match_the_textbook_loop():
    k = 60
    gen = torch.Generator().manual_seed(5)
    J = torch.randn(k, 40, generator=gen, dtype=F64)
    (orders,) = orders_of(3, k)
    C = pcgrad_coefficients(J @ J.T, orders)
    projected = (C - torch.eye(k, dtype=F64)).count_nonzero()
    assert projected > k  # plenty of projections happened
    torch.testing.assert_close(C @ J, textbook(J, orders), atol=1e-9, rtol=0)


def test_the_order_matters_and_the_seed_makes_it_reproducible():
    J = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    same = [weights(pcgrad(6, seed=7), J) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1], atol=0, rtol=0)
    other = weights(pcgrad(6, seed=8), J)
    assert (other - same[0]).abs().max() > 1e-3  # another order, another answer (K >= 3)
    method = pcgrad(6, seed=7)
    first, second = weights(method, J), weights(method, J)  # fresh orders every step
    torch.testing.assert_close(first, same[0], atol=0, rtol=0)
    assert (second - first).abs().max() > 1e-3


def test_the_global_rng_is_untouched():
    J = torch.randn(5, 3, dtype=F64)
    state = torch.get_rng_state()
    weights(pcgrad(5), J)
    assert torch.equal(state, torch.get_rng_state())


def test_a_resumed_method_draws_the_same_orders():
    tasks, net, x, y = make_problem(k=5)
    a = PCGrad(seed=11)
    for _ in range(3):
        net.zero_grad(set_to_none=True)
        a.backward(tasks.losses(net(x), y), net)
    b = PCGrad(seed=11)
    b.load_state_dict(a.state_dict())
    fresh = PCGrad(seed=11)
    fresh.setup(tasks)
    G = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    G = G @ G.T  # five tasks in a plane: many conflicts, the order matters
    losses = torch.ones(5, dtype=F64)
    behind = 0.0
    for _ in range(4):
        wa, wb, wf = a.weights(G, losses), b.weights(G, losses), fresh.weights(G, losses)
        torch.testing.assert_close(wa, wb, atol=0, rtol=0)
        behind = max(behind, float((wa - wf).abs().max()))
    assert behind > 1e-6  # the fresh one is 3 draws behind


@given(
    k=st.integers(2, 8),
    seed=st.integers(0, 10_000),
    exponent=st.sampled_from([-8.0, -3.0, 0.0, 4.0, 8.0]),
)
@settings(max_examples=40, deadline=None)
def test_the_weights_do_not_depend_on_the_gradients_scale(k, seed, exponent):
    J = torch.randn(k, 5, generator=torch.Generator().manual_seed(seed), dtype=F64)
    w = weights(pcgrad(k, seed=seed), J)
    scaled = weights(pcgrad(k, seed=seed), J * 10.0**exponent)
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled, w, atol=1e-9, rtol=1e-9)
    G = J @ J.T
    exact = pcgrad(k, seed=seed).weights(G * 2.0**40, torch.ones(k, dtype=F64))  # a power of two: bitwise
    torch.testing.assert_close(exact, w, atol=0, rtol=0)


def test_skip_self_matters_when_projections_turn_p_against_its_own_gradient():
    g1 = torch.tensor([1.0, 0.0], dtype=F64)
    g2 = torch.tensor([-1.0, 0.2], dtype=F64)
    g3 = torch.tensor([-1.0, -2.0], dtype=F64)
    J = torch.stack([g1, g2, g3])
    orders = torch.tensor([[1, 2, 0], [0, 1, 2], [0, 1, 2]])  # task 1 meets g_2, g_3, then itself
    p_skip = (pcgrad_coefficients(J @ J.T, orders, skip_self=True) @ J)[0]
    p_all = (pcgrad_coefficients(J @ J.T, orders, skip_self=False) @ J)[0]
    assert p_skip @ g1 < -1e-3  # the paper's loop leaves p_1 conflicting with g_1
    assert abs(p_all @ g1) < 1e-15  # the ports' loop projects it off g_1 too
    torch.testing.assert_close(p_all, textbook(J, orders, skip_self=False)[0], atol=1e-15, rtol=0)
    torch.testing.assert_close(p_skip, textbook(J, orders, skip_self=True)[0], atol=1e-15, rtol=0)


def test_degenerate_gradients():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    assert weights(pcgrad(1), g[None]).tolist() == [1.0]
    # opposite tasks cancel exactly: p_1 = p_2 = g_1 + g_2 = 0
    J = torch.stack([g, -g])
    w = weights(pcgrad(2), J)
    torch.testing.assert_close(w, torch.tensor([2.0, 2.0], dtype=F64))
    # a zero and a tiny gradient are never projected on (weight exactly 1), nothing is NaN
    other = torch.tensor([-1.0, 0.1, 0.0], dtype=F64)
    for tiny in (0.0, 1e-12):
        J = torch.stack([g, tiny * other, other, torch.zeros(3, dtype=F64)])
        w = weights(pcgrad(4), J)
        assert torch.isfinite(w).all() and w[1] == 1.0 and w[3] == 1.0
    # all gradients zero
    assert weights(pcgrad(3), torch.zeros(3, 4, dtype=F64)).tolist() == [1.0, 1.0, 1.0]
    # duplicated conflicting tasks at extreme scales
    J = torch.stack([g, g, other, other])
    for s in (1e-8, 1.0, 1e8):
        assert torch.isfinite(weights(pcgrad(4), s * J)).all()


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="square"):
        pcgrad_coefficients(torch.ones(2, 3, dtype=F64), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="orders"):
        pcgrad_coefficients(torch.eye(3, dtype=F64), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(mk.errors.ConfigError, match="reduction"):
        PCGrad(reduction="max")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_backward_matches_the_brute_force_reference(reduction):
    tasks, net, x, y = make_problem(k=4)
    J, heads, _ = brute_force(net, tasks, x, y)
    (orders,) = orders_of(2, 4)
    expected = textbook(J, orders).sum(0) / (4 if reduction == "mean" else 1)
    info = PCGrad(seed=2, reduction=reduction).backward(tasks.losses(net(x), y), net)
    torch.testing.assert_close(shared_grad(net), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(shared_grad(net), J.T @ info.weights, atol=1e-10, rtol=0)
    assert torch.equal(info.extras["orders"], orders)  # the step can be replayed
    for k, t in enumerate(tasks.names):  # heads get their own gradient
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, ref, atol=1e-12, rtol=0)


def test_an_unlabelled_task_is_left_out_of_the_projections():
    tasks, net, x, y = make_problem(k=4)
    y = dict(y)
    y["t2"] = torch.full_like(y["t2"], float("nan"))
    J, _, _ = brute_force(net, tasks, x, y)
    info = mk.methods.create("pcgrad", seed=4).backward(tasks.losses(net(x), y), net)
    (orders,) = orders_of(4, 3)  # three active tasks: a 3 x 3 draw
    live = J[[0, 1, 3]]
    assert info.weights[2] == 0
    torch.testing.assert_close(shared_grad(net), textbook(live, orders).sum(0), atol=1e-10, rtol=0)


def test_official_defaults():
    method = mk.methods.create("pcgrad")
    assert isinstance(method, PCGrad)
    assert (method.reduction, method.skip_self, method.head_grad, method.seed) == ("sum", True, "own", 0)
