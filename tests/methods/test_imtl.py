"""IMTL (IMTL-L scales + IMTL-G): the scaled problem against a brute-force computation."""

import pytest
import torch

import mtlkit as mk
from mtlkit.methods.imtl import IMTL
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import setup, shared_grad
from tests.methods.test_imtl_g import form_a

S = torch.tensor([0.3, -0.5, 1.1], dtype=torch.float64)


def make(tasks, net, s=S, **options):
    method = setup(IMTL(**options), tasks, net)
    with torch.no_grad():
        method.scales.copy_(s)
    return method


def brute_force_scaled(net, tasks, x, y, s):
    """Per-task gradients of the scaled losses exp(s_k) L_k - s_k (shared and heads) and the
    gradient of their sum w.r.t. s, each by its own autograd call."""
    s = s.clone().requires_grad_(True)
    rows, heads = [], []
    shared = net.shared_parameters()
    for k, t in enumerate(tasks.names):
        net.zero_grad(set_to_none=True)
        loss = tasks.losses(net(x), y)[t]
        (torch.exp(s[k]) * loss - s[k]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
        heads.append([p.grad.clone() for p in net.task_parameters()[t]])
    net.zero_grad(set_to_none=True)
    losses = torch.stack(list(tasks.losses(net(x), y).values())).detach()
    (s_grad,) = torch.autograd.grad((torch.exp(s) * losses - s).sum(), s)
    return torch.stack(rows), heads, s_grad


@pytest.mark.parametrize("head_grad", ["own", "weighted"])
def test_imtl_is_imtl_g_on_the_scaled_losses(head_grad):
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    Js, heads_s, s_grad = brute_force_scaled(net, tasks, x, y, S)
    method = make(tasks, net, head_grad=head_grad)
    info = method.backward(tasks.losses(net(x), y), net)
    w_scaled = form_a(Js)  # IMTL-G's weights on the scaled gradients exp(s_k) g_k
    torch.testing.assert_close(shared_grad(net), Js.T @ w_scaled, atol=1e-10, rtol=0)
    torch.testing.assert_close(method.scales.grad, s_grad, atol=1e-12, rtol=0)
    # reported: the effective weights of the raw losses, the raw Gramian, and the scales
    torch.testing.assert_close(info.weights, w_scaled * S.exp(), atol=1e-9, rtol=0)
    torch.testing.assert_close(shared_grad(net), J.T @ info.weights, atol=1e-10, rtol=0)
    torch.testing.assert_close(info.gramian, J @ J.T, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(info.grad_norms, J.norm(dim=1), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(info.extras["scales"], S.exp(), atol=1e-15, rtol=0)
    for k, t in enumerate(tasks.names):  # heads: their scaled loss's gradient (own) or weighted
        factor = 1.0 if head_grad == "own" else w_scaled[k]
        for p, g in zip(net.task_parameters()[t], heads_s[k], strict=True):
            torch.testing.assert_close(p.grad, factor * g, atol=1e-12, rtol=0)


def test_scales_change_the_direction_unlike_a_common_factor():
    # IMTL-G is equivariant to per-task scales, so the scaled direction is parallel to IMTL-G's;
    # the scales only change its length (through sum(w) = 1 on the scaled gradients)
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    make(tasks, net).backward(tasks.losses(net(x), y), net)
    d = shared_grad(net)
    w = form_a(J)
    ref = J.T @ w
    cos = (d @ ref) / (d.norm() * ref.norm())
    assert abs(abs(cos.item()) - 1) < 1e-10
    assert abs(d.norm().item() - ref.norm().item()) > 1e-6


def test_a_task_without_labels_gets_no_scale_gradient():
    tasks, net, x, y = make_problem(k=3)
    Js, _, s_grad = brute_force_scaled(net, tasks, x, y, S)
    y["t1"] = torch.full_like(y["t1"], float("nan"))
    method = make(tasks, net)
    info = method.backward(tasks.losses(net(x), y), net)
    assert info.weights[1] == 0 and method.scales.grad[1] == 0
    torch.testing.assert_close(method.scales.grad[[0, 2]], s_grad[[0, 2]], atol=1e-12, rtol=0)
    torch.testing.assert_close(shared_grad(net), Js[[0, 2]].T @ form_a(Js[[0, 2]]), atol=1e-10, rtol=0)


def test_scale_gradient_accumulates_and_the_lr_goes_to_the_param_group():
    tasks, net, x, y = make_problem(k=3)
    _, _, s_grad = brute_force_scaled(net, tasks, x, y, S)
    method = make(tasks, net, lr=0.05)
    for _ in range(2):
        method.backward(tasks.losses(net(x), y), net)
    torch.testing.assert_close(method.scales.grad, 2 * s_grad, atol=1e-12, rtol=0)
    (group,) = method.param_groups()
    assert group["lr"] == 0.05 and group["params"] == [method.scales] and group["weight_decay"] == 0


def test_the_scales_balance_every_scaled_loss_to_one():
    tasks, net, x, y = make_problem(k=3)
    y = {t: v * (3.0 * i + 0.2) for i, (t, v) in enumerate(y.items())}  # losses of different sizes
    method = make(tasks, net, s=torch.zeros(3, dtype=torch.float64), update_every=100)
    opt = torch.optim.Adam(method.parameters(), lr=0.2)
    for _ in range(200):  # the model stays fixed; only s learns
        opt.zero_grad()
        net.zero_grad(set_to_none=True)
        method.backward(tasks.losses(net(x), y), net)
        opt.step()
    losses = torch.stack(list(tasks.losses(net(x), y).values())).detach()
    torch.testing.assert_close(
        method.scales.detach().exp() * losses, torch.ones(3, dtype=torch.float64), rtol=1e-2, atol=0
    )


def test_needs_setup_and_reuses_weights_between_solves():
    tasks, net, x, y = make_problem(k=3)
    with pytest.raises(mk.errors.LifecycleError, match="set up"):
        IMTL().backward(tasks.losses(net(x), y), net)
    Js, heads_s, s_grad = brute_force_scaled(net, tasks, x, y, S)
    method = make(tasks, net, update_every=2)
    first = method.backward(tasks.losses(net(x), y), net)
    method.scales.grad = None
    net.zero_grad(set_to_none=True)
    second = method.backward(tasks.losses(net(x), y), net)  # reused weights, one backward
    assert second.extras["reused_weights"]
    torch.testing.assert_close(second.weights, first.weights, atol=1e-12, rtol=0)
    torch.testing.assert_close(shared_grad(net), Js.T @ form_a(Js), atol=1e-10, rtol=0)
    torch.testing.assert_close(method.scales.grad, s_grad, atol=1e-12, rtol=0)
    for k, t in enumerate(tasks.names):
        for p, g in zip(net.task_parameters()[t], heads_s[k], strict=True):
            torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=0)


def test_representation_level_scales_the_representation_gradients():
    tasks, net, x, y = make_problem(k=3, model="mmoe")
    J, _, H = brute_force(net, tasks, x, y)
    method = make(tasks, net, level="representation")
    out = net(x, full_output=True)
    info = method.backward(tasks.losses(out.predictions, y), net, out)
    e = S.exp()
    w_scaled = form_a(e[:, None] * H)
    torch.testing.assert_close(info.weights, w_scaled * e, atol=0, rtol=1e-6)
    torch.testing.assert_close(shared_grad(net), J.T @ info.weights, atol=1e-10, rtol=0)
    torch.testing.assert_close(info.gramian, H @ H.T, atol=1e-14, rtol=1e-10)
