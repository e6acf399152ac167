"""Loss weightings: each method's distinguishing property from the spec (item (g)), guards, K = 1."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.errors import NonPositiveLossError, TaskError
from tests.conftest import make_problem

LOSS_WEIGHTINGS = ["ew", "si", "gls", "uw", "imtl_l", "dwa", "rlw", "gradnorm", "famo", "stch"]
POSITIVE = ["si", "gls", "famo", "stch"]


def grads(net):
    return [p.grad.clone() if p.grad is not None else None for p in net.parameters()]


def reference_grads(net, objective):
    """Gradients of an explicit scalar objective, for comparison with a method's backward."""
    net.zero_grad(set_to_none=True)
    objective.backward()
    out = grads(net)
    net.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert (x is None and y is None) or torch.count_nonzero(x if x is not None else y) == 0
        else:
            torch.testing.assert_close(x, y, **(tol or {"atol": 1e-12, "rtol": 1e-10}))


def setup(method, tasks, net):
    method.setup(tasks.names, model=net)
    method.to("cpu")
    for p in method.parameters():
        p.data = p.data.double()
    return method


# -- SI and GLS ----------------------------------------------------------------------------------------
def test_si_is_the_gradient_of_the_sum_of_log_losses():
    tasks, net, x, y = make_problem(k=3)
    ref = reference_grads(net, sum(v.log() for v in tasks.losses(net(x), y).values()))
    info = mk.methods.SI().backward(tasks.losses(net(x), y), shared=net.shared_parameters())
    assert_same_grads(grads(net), ref)
    losses = info.losses
    torch.testing.assert_close(info.weights.double(), 1 / losses.double())


def test_si_direction_is_invariant_to_loss_scales_but_not_to_nonaffine_transforms():
    tasks, net, x, y = make_problem(k=2)

    def direction(transform):
        net.zero_grad(set_to_none=True)
        losses = tasks.losses(net(x), y)
        mk.methods.SI().backward({k: transform(i, v) for i, (k, v) in enumerate(losses.items())})
        return torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()])

    base = direction(lambda i, v: v)
    torch.testing.assert_close(direction(lambda i, v: v * (1e-3 if i == 0 else 250.0)), base)
    # (a power L^p only rescales log L: its direction is SI's too; L + L^2 is truly non-affine)
    other = direction(lambda i, v: v + v**2)
    assert not torch.allclose(other / other.norm(), base / base.norm(), atol=1e-3)


def test_gls_is_the_gradient_of_the_geometric_mean():
    tasks, net, x, y = make_problem(k=3)
    values = list(tasks.losses(net(x), y).values())
    ref = reference_grads(net, torch.stack(values).prod() ** (1 / 3))
    mk.methods.GLS().backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)


def test_gls_weights_stay_finite_where_the_product_underflows():
    k = 400
    losses = torch.full((k,), 1e-3, dtype=torch.float64)
    losses[0] = 5e-3
    assert torch.prod(losses) == 0  # the direct product underflows even in float64
    w = mk.methods.GLS().loss_weights(losses, torch.ones(k, dtype=torch.bool))
    gm = math.exp(float(losses.log().mean()))
    torch.testing.assert_close(w, gm / (k * losses))


# -- UW and IMTL-L ----------------------------------------------------------------------------------
@given(st.lists(st.floats(0.05, 20.0), min_size=1, max_size=4))
@settings(max_examples=10, deadline=None)
def test_uw_optimum_is_the_log_of_the_loss(values):
    # For fixed L_k the objective sum exp(-s)L/2 + s/2 is minimised at exp(s_k) = L_k.
    method = mk.methods.UW(min_log_var=None)
    method.setup([f"t{i}" for i in range(len(values))])
    opt = torch.optim.Adam(method.parameters(), lr=0.08)
    fixed = [torch.tensor(v, requires_grad=True) for v in values]
    for _ in range(800):
        opt.zero_grad()
        method.backward(fixed)
        opt.step()
    torch.testing.assert_close(method.scales.detach().exp(), torch.tensor(values), rtol=2e-3, atol=0)
    info = method.backward(fixed)
    torch.testing.assert_close(info.weights, 0.5 * torch.exp(-method.scales.detach()))


def test_uw_gradient_matches_the_official_objective():
    tasks, net, x, y = make_problem(k=3)
    method = setup(mk.methods.UW(init=0.3), tasks, net)
    s = method.scales
    values = list(tasks.losses(net(x), y).values())
    objective = sum(0.5 * torch.exp(-s[i]) * v + 0.5 * s[i] for i, v in enumerate(values))
    ref = reference_grads(net, objective)
    ref_s = s.grad.clone()
    s.grad = None
    method.backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)
    torch.testing.assert_close(s.grad, ref_s)


def test_uw_clamps_the_log_variance_from_below_and_recovers():
    method = mk.methods.UW()
    method.setup(["a"])
    with torch.no_grad():
        method.scales.fill_(-30.0)  # e.g. carried past the bound by Adam's momentum
    info = method.backward([torch.tensor(1e-20, requires_grad=True)])
    assert info.weights.item() == pytest.approx(0.5 * math.exp(10.0))  # the clamped weight
    assert method.scales.grad.item() == 0.0  # a push further down is blocked
    method.scales.grad = None
    method.backward([torch.tensor(5.0, requires_grad=True)])
    assert method.scales.grad.item() < 0  # a loss that grew again pulls s back up
    opt = torch.optim.SGD(method.parameters(), lr=1e-4)
    for _ in range(200):
        opt.zero_grad()
        method.backward([torch.tensor(5.0, requires_grad=True)])
        opt.step()
    assert method.scales.item() > -10.0  # back above the bound (a plain clamp would stay at -30)


def test_imtl_l_optimum_balances_every_scaled_loss_to_one():
    values = [0.02, 1.0, 37.0]
    method = mk.methods.IMTLL()
    method.setup(["a", "b", "c"])
    opt = torch.optim.Adam(method.parameters(), lr=0.05)
    fixed = [torch.tensor(v, requires_grad=True) for v in values]
    for _ in range(1500):
        opt.zero_grad()
        method.backward(fixed)
        opt.step()
    scaled = method.scales.detach().exp() * torch.tensor(values)
    torch.testing.assert_close(scaled, torch.ones(3), rtol=2e-3, atol=0)


def test_learned_scales_need_setup_before_the_optimizer():
    with pytest.raises(TaskError, match="setup"):
        mk.methods.UW().parameters()


def test_trainer_adds_method_parameters_with_their_lr_and_no_weight_decay():
    tasks, net, _, _ = make_problem(k=2, dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    trainer = mk.Trainer(net, tasks, mk.methods.UW(), opt, device="cpu", progress=False)
    group = trainer.optimizer.param_groups[-1]
    assert group["params"] == trainer.method.parameters()
    assert group["lr"] == 0.025 and group["weight_decay"] == 0.0
    trainer = mk.Trainer(net, tasks, "imtl_l", torch.optim.SGD(net.parameters(), lr=0.3), device="cpu")
    assert trainer.optimizer.param_groups[-1]["lr"] == 0.3  # IMTL-L: the optimiser's lr (LibMTL)


# -- DWA --------------------------------------------------------------------------------------------
def feed_epoch(method, per_task, steps=3):
    for _ in range(steps):
        method.backward([torch.tensor(v, requires_grad=True) for v in per_task])
    method.on_epoch_end()


def test_dwa_constant_losses_give_unit_weights_exactly():
    method = mk.methods.DWA()
    for _ in range(4):
        feed_epoch(method, [0.7, 3.0, 0.01])
    info = method.backward([torch.tensor(v, requires_grad=True) for v in [0.7, 3.0, 0.01]])
    assert info.weights.tolist() == [1.0, 1.0, 1.0]


def test_dwa_favours_the_slower_task_and_sums_to_k():
    method = mk.methods.DWA(temperature=2.0)
    seen = []
    for epoch in range(4):
        info = method.backward([torch.tensor(v, requires_grad=True) for v in [0.5**epoch, 1.0]])
        seen.append(info.weights)
        feed_epoch(method, [0.5**epoch, 1.0], steps=2)
    assert seen[0].tolist() == [1.0, 1.0] and seen[1].tolist() == [1.0, 1.0]
    w = seen[2]
    expected = 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2.0, dim=0)  # r = (0.5, 1)
    torch.testing.assert_close(w, expected)
    assert w[0] < w[1] and float(w.sum()) == pytest.approx(2.0)


def test_dwa_iteration_window_variant():
    method = mk.methods.DWA(window=3)
    losses = [[1.0, 2.0], [1.0, 2.0], [0.9, 2.0], [0.5, 2.0], [0.4, 2.0], [0.3, 2.1]]
    weights = [method.backward([torch.tensor(v, requires_grad=True) for v in row]).weights for row in losses]
    assert all(w.tolist() == [0.5, 0.5] for w in weights[:5])  # before 2n steps: 1/K each
    t = torch.tensor(losses)
    ratio = t[3:].mean(0) / t[:3].mean(0)
    torch.testing.assert_close(weights[5], torch.softmax(ratio / 2.0, dim=0))  # 2 softmax / K


# -- RLW --------------------------------------------------------------------------------------------
def test_rlw_weights_are_on_the_simplex_and_uniform_in_expectation():
    active = torch.ones(4, dtype=torch.bool)
    for dist in ("normal", "uniform", "dirichlet"):
        method = mk.methods.RLW(distribution=dist, seed=3)
        ws = torch.stack([method.loss_weights(torch.ones(4), active) for _ in range(20000)])
        torch.testing.assert_close(ws.sum(1), torch.ones(20000))
        assert (ws > 0).all()
        stderr = float(ws.std(0).max()) / math.sqrt(len(ws))
        torch.testing.assert_close(ws.mean(0), torch.full((4,), 0.25), atol=5 * stderr, rtol=0)


def test_rlw_is_reproducible_and_resumes_its_stream():
    fixed = [torch.tensor(1.0, requires_grad=True) for _ in range(3)]
    a = mk.methods.RLW(seed=11)
    first = [a.backward(fixed).weights for _ in range(5)]
    state = a.state_dict()
    later = [a.backward(fixed).weights for _ in range(5)]
    b = mk.methods.RLW(seed=11)
    assert all(
        torch.equal(u, v) for u, v in zip(first, [b.backward(fixed).weights for _ in range(5)], strict=True)
    )
    c = mk.methods.RLW(seed=999)
    c.load_state_dict(state)
    assert all(
        torch.equal(u, v) for u, v in zip(later, [c.backward(fixed).weights for _ in range(5)], strict=True)
    )
    torch.manual_seed(5)
    d1 = mk.methods.RLW().backward(fixed).weights
    torch.manual_seed(5)
    assert torch.equal(d1, mk.methods.RLW().backward(fixed).weights)  # seed=None follows torch.manual_seed


# -- STCH -------------------------------------------------------------------------------------------
def test_stch_warmup_then_nadir_then_smooth_tchebycheff():
    tasks, net, x, y = make_problem(k=3)
    method = mk.methods.STCH(mu=0.7, warmup_epochs=1)
    values = list(tasks.losses(net(x), y).values())
    # warm-up: the gradient of sum log(L + 1e-20)
    ref = reference_grads(net, sum(torch.log(v + 1e-20) for v in values))
    method.backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)
    method.on_epoch_end()
    assert method.phase == "nadir"
    recorded = []
    for scale in (1.0, 3.0):
        recorded.append(torch.tensor([float(v.detach()) * scale for v in values], dtype=torch.float64))
        method.backward([v * scale for v in tasks.losses(net(x), y).values()])
    method.on_epoch_end()
    torch.testing.assert_close(method.nadir, (recorded[0] + recorded[1]) / 2)
    net.zero_grad(set_to_none=True)
    values = list(tasks.losses(net(x), y).values())
    logs = torch.stack([torch.log(v / n + 1e-20) for v, n in zip(values, method.nadir, strict=True)])
    ref = reference_grads(net, 3 * 0.7 * torch.logsumexp(logs / 0.7, dim=0))
    info = method.backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)
    assert info.extras["phase"] == "stch"


def test_stch_limits_in_mu():
    losses = torch.tensor([0.3, 2.0, 0.9], dtype=torch.float64)
    nadir = [1.0, 1.0, 1.0]
    active = torch.ones(3, dtype=torch.bool)
    sharp = mk.methods.STCH(mu=1e-4, nadir=nadir)
    sharp.setup(["a", "b", "c"])
    w = sharp.loss_weights(losses, active)  # -> K e_argmax / L_argmax (Tchebycheff)
    torch.testing.assert_close(w, torch.tensor([0.0, 3 / 2.0, 0.0], dtype=torch.float64))
    smooth = mk.methods.STCH(mu=1e6, nadir=nadir)
    smooth.setup(["a", "b", "c"])
    torch.testing.assert_close(smooth.loss_weights(losses, active), 1 / losses, rtol=1e-5, atol=0)  # -> SI


# -- FAMO -------------------------------------------------------------------------------------------
def test_famo_effective_weights_are_the_gradient_of_its_surrogate():
    tasks, net, x, y = make_problem(k=3)
    method = setup(mk.methods.FAMO(max_norm=None), tasks, net)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
    z = torch.softmax(method.logits.detach(), 0).double()
    values = list(tasks.losses(net(x), y).values())
    d = torch.stack(values) + 1e-8
    c = (z / d.detach()).sum()
    ref = reference_grads(net, (z / c * d.log()).sum())
    info = method.backward(tasks.losses(net(x), y), shared=net.shared_parameters())
    assert_same_grads(grads(net), ref)
    assert float(info.weights.sum()) == pytest.approx(1.0)


def test_famo_shifts_weight_to_the_task_that_improved_less():
    method = mk.methods.FAMO()
    method.setup(["fast", "slow"])
    before = [torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)]
    method.backward(before)
    method.after_step([torch.tensor(0.5), torch.tensor(1.0)])
    z = torch.softmax(method.logits.detach(), 0)
    assert z[1] > 0.5 > z[0]


def test_famo_logit_update_matches_the_official_formula():
    method = mk.methods.FAMO(lr=0.025, gamma=1e-3)
    method.setup(["a", "b", "c"])
    xi = torch.zeros(3, requires_grad=True)
    ref_opt = torch.optim.Adam([xi], lr=0.025, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        prev = torch.rand(3, generator=gen) + 0.1
        curr = prev * (0.5 + torch.rand(3, generator=gen))
        method.backward([v.clone().requires_grad_() for v in prev])
        method.after_step(list(curr))
        delta = (prev + 1e-8).log() - (curr + 1e-8).log()
        (g,) = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)
        ref_opt.zero_grad()
        xi.grad = g
        ref_opt.step()
        torch.testing.assert_close(method.logits.detach(), xi.detach())


def test_famo_clips_the_shared_gradient_and_never_builds_task_gradients(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("FAMO must not compute per-task gradients")

    for name in ("jacobian", "parameter_gramian", "representation_gradients", "task_gradient_norms"):
        monkeypatch.setattr(mk.GradientEngine, name, forbidden)
    tasks, net, x, y = make_problem(k=3)
    (sum(tasks.losses(net(x), y).values()) * 1e3).backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in net.shared_parameters()]) > 1.0
    net.zero_grad(set_to_none=True)
    mk.methods.FAMO(max_norm=0.5).backward(
        {k: v * 1e3 for k, v in tasks.losses(net(x), y).items()}, shared=net.shared_parameters()
    )
    total = torch.nn.utils.get_total_norm([p.grad for p in net.shared_parameters()])
    assert float(total) == pytest.approx(0.5)


def test_famo_state_is_a_copy_not_the_live_optimizer():
    a = mk.methods.FAMO()
    a.setup(["x", "y"])
    for _ in range(2):
        a.backward([torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)])
        a.after_step([torch.tensor(0.5), torch.tensor(1.9)])
    saved = a.state_dict()
    frozen = repr(saved)
    b = mk.methods.FAMO()
    b.load_state_dict(saved)
    b_state = repr(b.state_dict())
    a.backward([torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)])
    a.after_step([torch.tensor(0.3), torch.tensor(1.9)])
    assert repr(saved) == frozen  # a later step does not change a saved state
    assert repr(b.state_dict()) == b_state  # nor a method loaded from it


def test_famo_after_step_needs_a_backward():
    method = mk.methods.FAMO()
    with pytest.raises(TaskError, match="preceding backward"):
        method.after_step([torch.tensor(1.0)])


# -- GradNorm ---------------------------------------------------------------------------------------
class TwoTaskLinear(torch.nn.Module):
    """x -> W x (the shared layer) -> two linear heads; task 2's loss is scaled by 100."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(4, 3).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(3, 1).double() for _ in range(2)])

    def losses(self, x, y):
        z = self.shared(x)
        return {
            "a": ((self.heads[0](z).squeeze(-1) - y[0]) ** 2).mean(),
            "b": 100 * ((self.heads[1](z).squeeze(-1) - y[1]) ** 2).mean(),
        }


def gradnorm_balance(initial_scale: float, steps: int = 600):
    torch.manual_seed(0)
    net = TwoTaskLinear()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randn(2, 32, dtype=torch.float64)
    method = mk.methods.GradNorm(alpha=1.5, layer=[net.shared.weight])
    method.setup(["a", "b"])
    method.logits.data = method.logits.data.double()
    opt = torch.optim.Adam(method.parameters(), lr=0.025)  # only the weights move: rates stay fixed
    ratios = []
    for i in range(steps):
        opt.zero_grad()
        net.zero_grad()
        losses = net.losses(x, y)
        if i == 0 and initial_scale != 1.0:
            method.initial_losses = torch.tensor(
                [float(losses["a"].detach()), float(losses["b"].detach()) * initial_scale],
                dtype=torch.float64,
            )
        info = method.backward(losses)
        opt.step()
        g = info.weights * info.grad_norms
        ratios.append(float(g[0] / g[1]))
    return sum(ratios[-50:]) / 50  # L_grad is an L1 loss: the weights end in a small oscillation


def test_gradnorm_equalises_weighted_gradient_norms():
    # equal training rates -> target G_1 / G_2 = 1 although task b's gradient is ~100x larger
    assert gradnorm_balance(1.0) == pytest.approx(1.0, rel=0.05)


def test_gradnorm_asymmetry_follows_the_training_rates():
    # L_b(0) doubled: L~ = (1, 0.5), r = (4/3, 2/3), targets Gbar r^alpha. With w_a + w_b = 2 the
    # targets cannot both be met (mean r^alpha != 1); the L1 objective settles where the task with
    # the larger layer gradient (b, 100x) meets its own: G_b = Gbar r_b^alpha, so
    # G_a / G_b = (2 - r_b^alpha) / r_b^alpha = 2.674, close to the paper's (r_a / r_b)^alpha = 2.83.
    rb = (2 / 3) ** 1.5
    got = gradnorm_balance(2.0, steps=800)
    assert got == pytest.approx((2 - rb) / rb, rel=0.02)
    assert got == pytest.approx(2.0**1.5, rel=0.06)


def test_gradnorm_weight_gradient_and_model_gradient_match_the_paper():
    tasks, net, x, y = make_problem(k=3)
    method = setup(mk.methods.GradNorm(alpha=1.5), tasks, net)
    layer = net.last_shared_parameters()
    assert layer == [net.bottom[-2].weight]  # the last shared Linear's weight matrix
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64))
    values = list(tasks.losses(net(x), y).values())
    l0 = torch.tensor(
        [float(v.detach()) * f for v, f in zip(values, (1.0, 1.5, 0.7), strict=True)], dtype=torch.float64
    )
    method.initial_losses = l0.clone()
    # reference: explicit norms by autograd, the LibMTL/paper L_grad, its gradient w.r.t. v
    norms = torch.stack([torch.autograd.grad(v, layer, retain_graph=True)[0].norm() for v in values])
    w = 3 * torch.softmax(method.logits, 0)
    g = w * norms
    rate = torch.stack(values).detach() / l0
    target = (g.mean() * (rate / rate.mean()) ** 1.5).detach()
    (ref_v,) = torch.autograd.grad((g - target).abs().sum(), method.logits)
    ref = reference_grads(net, (w.detach() * torch.stack(values)).sum())
    info = method.backward(tasks.losses(net(x), y))
    assert_same_grads(grads(net), ref)
    torch.testing.assert_close(method.logits.grad, ref_v)
    torch.testing.assert_close(info.grad_norms, norms.detach())


def test_gradnorm_first_epoch_initial_losses_as_in_libmtl():
    method = mk.methods.GradNorm(layer=[torch.nn.Parameter(torch.ones(1))], initial="first_epoch")
    method.setup(["a", "b"])
    for v in ([1.0, 4.0], [3.0, 2.0]):
        info = method.backward([torch.tensor(x, requires_grad=True) for x in v])
        assert info.weights.tolist() == [1.0, 1.0] and method.logits.grad is None  # EW in epoch 0
    method.on_epoch_end()
    torch.testing.assert_close(method.initial_losses, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_gradnorm_needs_a_layer():
    method = mk.methods.GradNorm()
    method.setup(["a"])
    with pytest.raises(mk.errors.EngineError, match="layer"):
        method.backward([torch.tensor(1.0, requires_grad=True)])
    tasks, net, _, _ = make_problem(k=2)
    by_name = mk.methods.GradNorm(layer="towers.t0")
    by_name.setup(tasks.names, model=net)
    assert by_name._layer == list(net.towers["t0"].parameters())
    with pytest.raises(TaskError, match="no trainable parameter"):
        mk.methods.GradNorm(layer="nope").setup(tasks.names, model=net)
    net.bottom[-2].weight.requires_grad_(False)  # a frozen last shared layer
    with pytest.raises(TaskError, match="frozen"):
        mk.methods.GradNorm().setup(tasks.names, model=net)


# -- every method: guards, K = 1, missing labels ---------------------------------------------------
def make_method(name, tasks, net):
    return setup(mk.methods.create(name), tasks, net)


@pytest.mark.parametrize("name", POSITIVE)
def test_non_positive_loss_raises_before_anything_changes(name):
    tasks, net, x, y = make_problem(k=2)
    method = make_method(name, tasks, net)
    state = repr(method.state_dict())
    losses = tasks.losses(net(x), y)
    bad = {"t0": losses["t0"], "t1": losses["t1"] * 0 - 1.0}
    with pytest.raises(NonPositiveLossError, match="t1"):
        method.backward(bad, shared=net.shared_parameters())
    assert all(p.grad is None for p in net.parameters())
    assert repr(method.state_dict()) == state


def run_steps(method, tasks, net, x, y, steps, method_lr=0.0, after_scale=1.0):
    """``steps`` method steps with the hooks a caller owes (the model itself is not updated; with
    ``method_lr`` the method's own parameters take SGD steps). Returns the last StepInfo."""
    for _ in range(steps):
        net.zero_grad(set_to_none=True)
        info = method.backward(tasks.losses(net(x), y), shared=net.shared_parameters())
        for p in method.parameters():
            if method_lr and p.grad is not None:
                p.data -= method_lr * p.grad
            p.grad = None
        if "post_step_losses" in method.hooks:
            with torch.no_grad():
                new = tasks.losses(net(x), y)
                method.after_step(new if after_scale == 1.0 else {k: v * after_scale for k, v in new.items()})
        if "epoch_end" in method.hooks:
            method.on_epoch_end()
    return info


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_one_task_works(name):
    tasks, net, x, y = make_problem(k=1)
    method = make_method(name, tasks, net)
    info = run_steps(method, tasks, net, x, y, steps=3)
    assert torch.isfinite(info.weights).all() and info.weights.item() > 0
    g = torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_a_task_without_labels_gets_weight_zero_and_no_nan(name):
    tasks, net, x, y = make_problem(k=3)
    method = make_method(name, tasks, net)
    y = dict(y)
    y["t1"] = torch.full_like(y["t1"], float("nan"))  # no labelled sample for t1 in this batch
    info = run_steps(method, tasks, net, x, y, steps=2)
    assert info.weights[1] == 0 and torch.isfinite(info.weights).all()
    for p in net.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert all(p.grad is None or not p.grad.abs().sum() for p in net.towers["t1"].parameters())


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_state_round_trips(name):
    tasks, net, x, y = make_problem(k=3)
    a = make_method(name, tasks, net)
    run_steps(a, tasks, net, x, y, steps=3, method_lr=0.1, after_scale=0.9)
    b = make_method(name, tasks, net)
    b.load_state_dict(a.state_dict())
    for method in (a, b):
        net.zero_grad(set_to_none=True)
        info = method.backward(tasks.losses(net(x), y), shared=net.shared_parameters())
        method.result = (info.weights, grads(net))
    torch.testing.assert_close(a.result[0], b.result[0], atol=0, rtol=0)
    assert_same_grads(a.result[1], b.result[1], atol=0, rtol=0)
    with pytest.raises(TaskError):
        make_method(name, mk.TaskSet([mk.Task("other", loss="mse")]), net).load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_a_loaded_state_is_not_aliased(name):
    # neither the method that saved a state nor the one that loaded it changes the saved dict later
    tasks, net, x, y = make_problem(k=3)
    # options under which every epoch-based method accumulates something within epoch 0
    options = {"stch": {"warmup_epochs": 0}, "gradnorm": {"initial": "first_epoch"}}.get(name, {})

    def build():
        return setup(mk.methods.create(name, **options), tasks, net)

    a = build()
    for _ in range(2):  # mid-epoch: DWA's, STCH's and GradNorm's running sums are in the state
        a.backward(tasks.losses(net(x), y), shared=net.shared_parameters())
    saved = a.state_dict()
    frozen = repr(saved)
    b = build()
    b.load_state_dict(saved)
    for method in (a, b):
        run_steps(method, tasks, net, x, y, steps=2, method_lr=0.1, after_scale=0.9)
    assert repr(saved) == frozen


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_gradscaler_loss_scale_is_transparent(name):
    # With losses multiplied by S and loss_scale=S, every gradient (model and method parameters)
    # is exactly S times the unscaled one and the weights are unchanged: what GradScaler expects.
    tasks, net, x, y = make_problem(k=3)
    scale = 2.0**10
    runs = []
    for s in (None, scale):
        torch.manual_seed(1)  # RLW draws its seed from the global generator
        method = make_method(name, tasks, net)
        net.zero_grad(set_to_none=True)
        losses = tasks.losses(net(x), y)
        if s is not None:
            losses = mk.TaskLosses({k: v * s for k, v in losses.items()})
        info = method.backward(losses, shared=net.shared_parameters(), loss_scale=s)
        method_grads = [p.grad.clone() for p in method.parameters() if p.grad is not None]
        runs.append((info.weights, info.losses, grads(net), method_grads))
    (w0, l0, g0, m0), (w1, l1, g1, m1) = runs
    torch.testing.assert_close(w1, w0)
    torch.testing.assert_close(l1, l0)
    assert_same_grads(g1, [g * scale if g is not None else None for g in g0], atol=1e-9, rtol=1e-9)
    assert len(m0) == len(m1)
    for a, b in zip(m0, m1, strict=True):
        torch.testing.assert_close(b, a * scale)
