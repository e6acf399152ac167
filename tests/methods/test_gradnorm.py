"""GradNorm: the paper's weight gradient, the equilibrium of the L1 objective, the layer choices."""

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError, LifecycleError
from tests.conftest import make_problem
from tests.methods.helpers import assert_same_grads, grads, reference_grads, setup


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
    method.double()
    method.begin_epoch()
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
        info = method.backward(losses, shared=[net.shared.weight])
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
    method.begin_epoch()
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
    method.begin_epoch()
    for v in ([1.0, 4.0], [3.0, 2.0]):
        info = method.backward([torch.tensor(x, requires_grad=True) for x in v])
        assert info.weights.tolist() == [1.0, 1.0] and method.logits.grad is None  # EW in epoch 0
    method.on_epoch_end()
    torch.testing.assert_close(method.initial_losses, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_gradnorm_needs_a_layer():
    method = mk.methods.GradNorm()
    method.setup(["a"])
    method.begin_epoch()
    with pytest.raises(LifecycleError, match="layer"):
        method.backward([torch.tensor(1.0, requires_grad=True)])
    tasks, net, _, _ = make_problem(k=2)
    by_name = mk.methods.GradNorm(layer="towers.t0")
    by_name.setup(tasks, model=net)
    assert by_name._layer == list(net.towers["t0"].parameters())
    with pytest.raises(ConfigError, match="no trainable parameter"):
        mk.methods.GradNorm(layer="nope").setup(tasks, model=net)
    net.bottom[-2].weight.requires_grad_(False)  # a frozen last shared layer
    with pytest.raises(ConfigError, match="frozen"):
        mk.methods.GradNorm().setup(tasks, model=net)


@pytest.mark.parametrize("given", ["module", "parameters"])
def test_gradnorm_layer_given_as_a_module_or_parameters_works_in_the_trainer(given):
    # documented, and broken before: the sentinel "given" was read as a parameter-name prefix
    tasks, net, x, y = make_problem(k=2, dtype=torch.float32)
    layer = net.bottom[0] if given == "module" else list(net.bottom[0].parameters())
    trainer = mk.Trainer(net, tasks, mk.methods.GradNorm(layer=layer), device="cpu", progress=False)
    data = [(x.float(), {k: v.float() for k, v in y.items()})] * 3
    trainer.fit(data, epochs=2)
    assert trainer.method.logits.grad is not None and trainer.last_info.grad_norms is not None
