"""EW and MGDA through the method interface."""

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import NonFiniteLossError, TaskError, UnknownNameError
from mtlkit.methods.min_norm import kkt_violation
from tests.conftest import make_problem
from tests.core.test_engine import brute_force


def shared_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()])


def test_registry_names_and_close_matches():
    assert {"ew", "mgda"} <= set(mk.methods.available())
    assert isinstance(mk.methods.create("MGDA", normalization="l2"), mk.methods.MGDA)
    with pytest.raises(UnknownNameError, match="Did you mean 'mgda'"):
        mk.methods.create("mdga")


def test_ew_gradient_equals_autograd_of_the_summed_loss():
    tasks, net, x, y = make_problem(k=3)
    (sum(tasks.losses(net(x), y).values())).backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    info = mk.methods.create("ew").backward(tasks.losses(net(x), y), shared=net.shared_parameters())
    for p, r in zip(net.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r, atol=1e-12, rtol=0)
    assert info.weights.tolist() == [1.0, 1.0, 1.0] and info.level == "loss"


def test_ew_fixed_weights():
    tasks, net, x, y = make_problem(k=2)
    losses = tasks.losses(net(x), y)
    (0.5 * losses["t0"] + 2.0 * losses["t1"]).backward()
    ref = shared_grad(net).clone()
    net.zero_grad(set_to_none=True)
    mk.methods.EW(weights={"t0": 0.5, "t1": 2.0}).backward(tasks.losses(net(x), y))
    torch.testing.assert_close(shared_grad(net), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_mgda_direction_is_the_min_norm_point(level):
    tasks, net, x, y = make_problem(k=4)
    J, _, H = brute_force(net, tasks, x, y)
    method = mk.methods.MGDA(level=level)
    out = net(x)
    info = method.backward(tasks.losses(out, y), shared=net.shared_parameters(), features=net.last_features)
    G = J @ J.T if level == "parameter" else H @ H.T
    w = info.weights.double()
    assert kkt_violation(G, w) < 1e-9
    torch.testing.assert_close(shared_grad(net), J.T @ w, atol=1e-10, rtol=0)
    torch.testing.assert_close(info.gramian, G, atol=1e-10, rtol=0)
    torch.testing.assert_close(info.grad_norms, G.diagonal().sqrt(), atol=1e-10, rtol=0)


def test_mgda_ub_equals_mgda_for_a_single_sample_linear_trunk():
    """Spec 4.2(g)1: z = W x with batch size 1 gives G_theta = ||x||^2 G_z, so equal weights."""
    tasks = mk.TaskSet([mk.Task(f"t{i}") for i in range(3)])
    net = mk.models.SharedBottom(4, tasks, bottom_dims=[6], tower_dims=[5]).double()
    net.bottom = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = {t: torch.randn(1, dtype=torch.float64) for t in tasks.names}
    w_param = mk.methods.MGDA().backward(tasks.losses(net(x), y), net.shared_parameters()).weights
    w_rep = (
        mk.methods.MGDA(level="representation")
        .backward(tasks.losses(net(x), y), features=net.last_features)
        .weights
    )
    torch.testing.assert_close(w_param, w_rep, atol=1e-9, rtol=0)


def test_mgda_normalisations_and_scale():
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    norms = J.norm(dim=1)
    losses = tasks.losses(net(x), y)
    lvals = torch.stack([v.detach() for v in losses.values()])
    info = mk.methods.MGDA(normalization="loss+", scale="num_tasks").backward(losses, net.shared_parameters())
    n = lvals * norms
    Jn = J / n[:, None]
    w_solver = info.weights / 3
    assert kkt_violation(Jn @ Jn.T, w_solver) < 1e-8  # solved on the normalised gradients
    torch.testing.assert_close(
        shared_grad(net), J.T @ info.weights, atol=1e-10, rtol=0
    )  # applied to raw ones
    net.zero_grad(set_to_none=True)
    info = mk.methods.MGDA(normalization="l2", normalize_final=True).backward(
        tasks.losses(net(x), y), net.shared_parameters()
    )
    Jn = J / norms[:, None]
    assert kkt_violation(Jn @ Jn.T, info.weights * norms) < 1e-8


def test_mgda_leaves_out_a_task_without_labels():
    tasks, net, x, y = make_problem(k=3)
    y["t1"] = torch.full_like(y["t1"], float("nan"))
    info = mk.methods.MGDA().backward(tasks.losses(net(x), y), net.shared_parameters())
    assert info.weights[1] == 0 and abs(info.weights.sum().item() - 1) < 1e-12
    assert shared_grad(net).norm() > 0  # the zero gradient of t1 did not collapse the update


@pytest.mark.parametrize("name", ["ew", "mgda"])
def test_one_task(name):
    tasks, net, x, y = make_problem(k=1)
    info = mk.methods.create(name).backward(tasks.losses(net(x), y), net.shared_parameters())
    assert info.weights.tolist() == [1.0]
    assert shared_grad(net).norm() > 0


@pytest.mark.parametrize("name", ["ew", "mgda"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_before_any_update(name, bad):
    tasks, net, x, y = make_problem(k=2)
    losses = tasks.losses(net(x), y)
    losses["t1"] = losses["t1"] * bad
    with pytest.raises(NonFiniteLossError, match="t1"):
        mk.methods.create(name).backward(losses, net.shared_parameters())
    assert all(p.grad is None for p in net.parameters())


def test_method_rejects_changing_task_sets_and_non_scalars():
    tasks, net, x, y = make_problem(k=2)
    method = mk.methods.create("ew")
    method.backward(tasks.losses(net(x), y))
    with pytest.raises(TaskError, match="first used with tasks"):
        method.backward({"other": torch.ones((), requires_grad=True)})
    with pytest.raises(TaskError, match="scalar"):
        mk.methods.create("mgda").backward({"a": torch.ones(3, requires_grad=True)})
    with pytest.raises(TaskError, match="no task losses"):
        mk.methods.create("mgda").backward({})


def test_mgda_warm_start_gives_the_cold_start_solution_and_round_trips():
    tasks, net, x, y = make_problem(k=5)
    warm, cold = mk.methods.MGDA(), mk.methods.MGDA(warm_start=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        a = warm.backward(tasks.losses(net(x), y), net.shared_parameters()).weights
        opt.zero_grad(set_to_none=True)
        b = cold.backward(tasks.losses(net(x), y), net.shared_parameters()).weights
        d_warm = J_T(net, tasks, x, y, a)
        d_cold = J_T(net, tasks, x, y, b)
        torch.testing.assert_close(d_warm, d_cold, atol=1e-9, rtol=0)  # the direction is unique
        opt.step()
    state = warm.state_dict()
    assert state["previous_weights"] is not None
    clone = mk.methods.MGDA()
    clone.load_state_dict(state)
    torch.testing.assert_close(clone._previous, warm._previous.cpu())


def J_T(net, tasks, x, y, w):
    J, _, _ = brute_force(net, tasks, x, y)
    return J.T @ w.double()
