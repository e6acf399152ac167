"""ExcessMTL: the excess-risk proxy, the baseline and warm-up, the exponentiated weights, heads."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.methods.excess_mtl import ExcessMTL
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import linear_step, shared_grad


class Reference:
    """The official code / LibMTL port, task by task; with ``relative`` this library's choices: a
    relative epsilon on the baseline, a baseline that waits for a non-zero excess (the official
    code divides by E0 alone and gives NaN for a zero first gradient), and the weight moved only
    among tasks past their warm-up (keeping their total)."""

    def __init__(self, k, eta, relative=True):
        self.eta, self.relative = eta, relative
        self.acc, self.w = None, torch.ones(k, dtype=torch.float64)
        self.baseline, self.seen, self.total = [None] * k, [0] * k, [0.0] * k

    def step(self, J):
        self.acc = J**2 if self.acc is None else self.acc + J**2
        E = (J**2 / torch.sqrt(self.acc + 1e-7)).sum(1)
        ready = [k for k, b in enumerate(self.baseline) if b is not None]
        if ready:
            E0 = torch.stack([self.baseline[k] for k in ready])
            floor = 1e-7 * E0.max() if self.relative else 0.0
            moved = self.w[ready] * torch.exp(self.eta * E[ready] / (E0 + floor))
            self.w[ready] = moved / moved.sum() * self.w[ready].sum()
        for k, b in enumerate(self.baseline):
            if b is None:
                self.seen[k] += 1
                self.total[k] = self.total[k] + E[k]
                if self.total[k] > 0 or not self.relative:
                    self.baseline[k] = self.total[k] / self.seen[k]
        return self.w.clone()


@pytest.mark.parametrize("head_grad", ["weighted", "own"])
@pytest.mark.parametrize("seed", [0, 1])
def test_end_to_end_matches_the_official_update_through_backward(head_grad, seed):
    # seed 0: a task's shared gradient is exactly 0 at the first step (a dead ReLU in its tower),
    # where the official code gives NaN weights; seed 1: no zero gradient, official = ours to 1e-6
    torch.manual_seed(seed)
    tasks, net, x0, y0 = make_problem(k=3)
    method = mk.methods.create("excess_mtl", robust_step_size=0.5, head_grad=head_grad)
    ref, official = Reference(3, 0.5), Reference(3, 0.5, relative=False)
    for _ in range(4):
        x = torch.randn_like(x0)
        y = {k: torch.randn_like(v) for k, v in y0.items()}
        J, heads, _ = brute_force(net, tasks, x, y)
        w, w_official = ref.step(J), official.step(J)
        net.zero_grad(set_to_none=True)
        info = method.backward(tasks.losses(net(x), y), net)
        torch.testing.assert_close(info.weights, w, atol=1e-14, rtol=1e-12)
        if seed == 1:
            torch.testing.assert_close(info.weights, w_official, atol=0, rtol=1e-6)  # the eps only
        torch.testing.assert_close(shared_grad(net), J.T @ w, atol=1e-12, rtol=1e-10)
        for k, name in enumerate(tasks.names):
            factor = w[k] if head_grad == "weighted" else 1.0
            for p, g in zip(net.task_parameters()[name], heads[k], strict=True):
                torch.testing.assert_close(p.grad, factor * g, atol=1e-12, rtol=1e-10)
    assert torch.isfinite(w_official).all() == (seed == 1)


def test_the_first_call_sets_the_baseline_and_keeps_the_weights():
    # (g) 1: E_k = sum_i g^2 / sqrt(g^2 + 1e-7) (about ||g_k||_1 for entries >> 3e-4)
    C = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.0, 3.0]], dtype=torch.float64)
    method = ExcessMTL()
    d, info = linear_step(method, C)
    E = (C**2 / torch.sqrt(C**2 + 1e-7)).sum(1)
    torch.testing.assert_close(method.baseline, E, atol=0, rtol=1e-15)
    torch.testing.assert_close(E, C.abs().sum(1), atol=0, rtol=1e-5)
    assert torch.equal(info.weights, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(d, C.sum(0), atol=1e-15, rtol=0)


def test_the_second_call_moves_the_weights_by_the_excess_ratio():
    # (g) 2: same gradients again: A = 2 g^2 and E / E0 = 1/sqrt(2) for every task (entries >> eps)
    eta = 0.7
    C = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0], [-2.0, 1.0, 0.5]], dtype=torch.float64)
    method = ExcessMTL(robust_step_size=eta)
    linear_step(method, C)
    _, info = linear_step(method, C)
    torch.testing.assert_close(info.weights, torch.ones(3, dtype=torch.float64), atol=0, rtol=1e-6)
    opposite = ExcessMTL(robust_step_size=eta)  # opposite and duplicate tasks: equal excess, equal weights
    for _ in range(3):
        _, info = linear_step(opposite, torch.cat([C[:1], -C[:1], C[:1]]))
        assert info.weights[0] == info.weights[1] == info.weights[2]
    # different ratios: task 0 doubles its gradient, task 1 keeps it, task 2 halves it
    method = ExcessMTL(robust_step_size=eta)
    linear_step(method, C)
    C2 = C * torch.tensor([[2.0], [1.0], [0.5]], dtype=torch.float64)
    _, info = linear_step(method, C2)
    E0 = (C**2 / torch.sqrt(C**2 + 1e-7)).sum(1)
    E = (C2**2 / torch.sqrt(C**2 + C2**2 + 1e-7)).sum(1)
    r = E / (E0 + 1e-7 * E0.max())
    w = info.weights
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert float(w[i] / w[j]) == pytest.approx(math.exp(eta * float(r[i] - r[j])), rel=1e-13)
    assert float(w.sum()) == pytest.approx(3.0, rel=1e-15)


def test_the_weights_sum_to_k_or_to_the_given_scale_with_the_same_ratios():
    # (g) 3: LibMTL / official sum K, TorchJD sum 1 (its robust_step_size 1.0); d scales with them
    gen = torch.Generator().manual_seed(1)
    methods = [ExcessMTL(robust_step_size=1.0), ExcessMTL(robust_step_size=1.0, scale=1.0)]
    for _ in range(3):
        C = torch.randn(4, 6, dtype=torch.float64, generator=gen)
        (d_k, info_k), (d_1, info_1) = (linear_step(m, C) for m in methods)
        assert float(info_k.weights.sum()) == pytest.approx(4.0, rel=1e-14)
        assert float(info_1.weights.sum()) == pytest.approx(1.0, rel=1e-14)
        torch.testing.assert_close(info_k.weights, 4 * info_1.weights, atol=0, rtol=1e-14)
        torch.testing.assert_close(d_k, 4 * d_1, atol=1e-14, rtol=1e-13)


def test_a_zero_first_gradient_gives_no_nan_and_its_baseline_waits_for_a_gradient():
    method = ExcessMTL(robust_step_size=1.0)
    C = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    linear_step(method, C)
    assert method.baseline[1] == 0 and method.warmup_count[1] == 1  # still warming up
    C2 = torch.tensor([[1.0, 2.0], [1e-6, 0.0]], dtype=torch.float64)
    _, info = linear_step(method, C2)
    assert torch.isfinite(info.weights).all()
    # task 1's baseline: the mean of its warm-up excesses, 0 and then E; task 0, the only task
    # past its warm-up, keeps the share it had
    E = (C2[1] ** 2 / torch.sqrt(C2[1] ** 2 + 1e-7)).sum()
    assert float(method.baseline[1]) == pytest.approx(float(E) / 2, rel=1e-15)
    assert torch.equal(info.weights, torch.ones(2, dtype=torch.float64))
    for _ in range(3):
        d, info = linear_step(method, C2)
        assert torch.isfinite(info.weights).all() and torch.isfinite(d).all()
        assert float(info.weights.sum()) == pytest.approx(2.0, rel=1e-14)


def test_warm_up_averages_the_excess_into_the_baseline():
    gen = torch.Generator().manual_seed(2)
    method = ExcessMTL(warmup_steps=3)
    acc, seen = torch.zeros(2, 5, dtype=torch.float64), []
    for _ in range(3):
        C = torch.randn(2, 5, dtype=torch.float64, generator=gen)
        _, info = linear_step(method, C)
        acc = acc + C**2
        seen.append((C**2 / torch.sqrt(acc + 1e-7)).sum(1))
        assert torch.equal(info.weights, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(method.baseline, torch.stack(seen).mean(0), atol=0, rtol=1e-14)
    _, info = linear_step(method, torch.randn(2, 5, dtype=torch.float64, generator=gen))
    assert not torch.equal(info.weights, torch.ones(2, dtype=torch.float64))


def test_a_task_without_labels_keeps_its_state_and_the_others_share_their_weight():
    gen = torch.Generator().manual_seed(3)
    method = ExcessMTL(robust_step_size=2.0)
    for _ in range(2):
        linear_step(method, torch.randn(3, 4, dtype=torch.float64, generator=gen))
    before = {k: v.clone() for k, v in method.state_dict().items() if k != "_extra_state"}
    C = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    d, info = linear_step(method, C, labelled=[2, 0, 2])
    for key in ("grad_sq_sum", "baseline", "warmup_sum", "warmup_count", "task_weights"):
        assert torch.equal(getattr(method, key)[1], before[key][1]), key
    w = method.task_weights
    assert info.weights[1] == 0 and info.weights[0] == w[0]
    assert float(w[[0, 2]].sum()) == pytest.approx(float(before["task_weights"][[0, 2]].sum()), rel=1e-14)
    assert float(w[0] / w[2]) != pytest.approx(float(before["task_weights"][0] / before["task_weights"][2]))
    torch.testing.assert_close(d, w[0] * C[0] + w[2] * C[2], atol=1e-14, rtol=1e-13)


@settings(max_examples=30, deadline=None)
@given(exponents=st.lists(st.integers(-8, 8), min_size=3, max_size=3), perm=st.permutations([0, 1, 2]))
def test_extreme_scales_stay_finite_and_task_order_does_not_matter(exponents, perm):
    gen = torch.Generator().manual_seed(4)
    c = torch.tensor([10.0**e for e in exponents], dtype=torch.float64)[:, None]
    plain, permuted = ExcessMTL(robust_step_size=1.0), ExcessMTL(robust_step_size=1.0)
    p = list(perm)
    for _ in range(3):
        C = torch.randn(3, 5, dtype=torch.float64, generator=gen) * c
        _, info = linear_step(plain, C)
        d, info_p = linear_step(permuted, C[p])
        assert torch.isfinite(info.weights).all() and torch.isfinite(d).all()
        assert float(info.weights.sum()) == pytest.approx(3.0, rel=1e-13)
        torch.testing.assert_close(info_p.weights, info.weights[p], atol=0, rtol=1e-12)


def test_one_task_keeps_weight_one_and_the_state_loads_before_the_first_step():
    method = ExcessMTL(robust_step_size=5.0)
    C = torch.tensor([[1.0, -3.0]], dtype=torch.float64)
    for _ in range(3):
        d, info = linear_step(method, C)
        assert float(info.weights) == 1.0
        torch.testing.assert_close(d, C[0], atol=0, rtol=0)
    fresh = ExcessMTL(robust_step_size=5.0)
    fresh.setup(["t0"])
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.grad_sq_sum, method.grad_sq_sum)
