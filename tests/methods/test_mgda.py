"""MGDA and MGDA-UB: the min-norm point, the normalisations, the warm start, missing labels."""

import pytest
import torch

import mtlkit as mk
from mtlkit.methods.min_norm import kkt_violation
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


@pytest.mark.parametrize("name", ["mgda", "mgda_ub"])
def test_mgda_direction_is_the_min_norm_point(name):
    tasks, net, x, y = make_problem(k=4)
    J, _, H = brute_force(net, tasks, x, y)
    method = mk.methods.create(name)
    out = net(x, full_output=True)
    info = method.backward(tasks.losses(out.predictions, y), net, out)
    G = J @ J.T if name == "mgda" else H @ H.T
    w = info.weights.double()
    assert kkt_violation(G, w) < 1e-9
    torch.testing.assert_close(shared_grad(net), J.T @ w, atol=1e-10, rtol=0)
    torch.testing.assert_close(info.gramian, G, atol=1e-10, rtol=0)
    torch.testing.assert_close(info.grad_norms, G.diagonal().sqrt(), atol=1e-10, rtol=0)


def test_mgda_ub_is_mgda_at_the_representation_level():
    assert isinstance(mk.methods.create("mgda_ub"), mk.methods.MGDA)
    assert mk.methods.create("mgda_ub").level == "representation"
    assert mk.methods.create("mgda_ub", level="parameter").level == "parameter"  # options still win


def test_mgda_ub_equals_mgda_for_a_single_sample_linear_trunk():
    """z = W x with batch size 1 gives G_theta = ||x||^2 G_z, so equal weights."""
    tasks = mk.TaskSet([mk.Task(f"t{i}") for i in range(3)])
    net = mk.models.SharedBottom(4, tasks, bottom_dims=[6], tower_dims=[5]).double()
    net.bottom = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = {t: torch.randn(1, dtype=torch.float64) for t in tasks.names}
    w_param = mk.methods.MGDA().backward(tasks.losses(net(x), y), net).weights
    out = net(x, full_output=True)
    w_rep = mk.methods.create("mgda_ub").backward(tasks.losses(out.predictions, y), net, out).weights
    torch.testing.assert_close(w_param, w_rep, atol=1e-9, rtol=0)


def test_mgda_representation_level_needs_the_representation():
    tasks, net, x, y = make_problem(k=2)
    with pytest.raises(mk.errors.EngineError, match="full_output"):
        mk.methods.create("mgda_ub").backward(tasks.losses(net(x), y), net)


def test_mgda_normalisations_and_scale():
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    norms = J.norm(dim=1)
    losses = tasks.losses(net(x), y)
    lvals = torch.stack([v.detach() for v in losses.values()])
    info = mk.methods.MGDA(normalization="loss+", scale="num_tasks").backward(losses, net)
    n = lvals * norms
    Jn = J / n[:, None]
    w_solver = info.weights / 3
    assert kkt_violation(Jn @ Jn.T, w_solver) < 1e-8  # solved on the normalised gradients
    torch.testing.assert_close(
        shared_grad(net), J.T @ info.weights, atol=1e-10, rtol=0
    )  # applied to raw ones
    net.zero_grad(set_to_none=True)
    info = mk.methods.MGDA(normalization="l2", normalize_final=True).backward(tasks.losses(net(x), y), net)
    Jn = J / norms[:, None]
    assert kkt_violation(Jn @ Jn.T, info.weights * norms) < 1e-8


def test_mgda_leaves_out_a_task_without_labels():
    tasks, net, x, y = make_problem(k=3)
    y["t1"] = torch.full_like(y["t1"], float("nan"))
    info = mk.methods.MGDA().backward(tasks.losses(net(x), y), net)
    assert info.weights[1] == 0 and abs(info.weights.sum().item() - 1) < 1e-12
    assert shared_grad(net).norm() > 0  # the zero gradient of t1 did not collapse the update


def test_mgda_warm_start_gives_the_cold_start_solution_and_round_trips():
    tasks, net, x, y = make_problem(k=5)
    warm, cold = mk.methods.MGDA(), mk.methods.MGDA(warm_start=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        a = warm.backward(tasks.losses(net(x), y), net).weights
        opt.zero_grad(set_to_none=True)
        b = cold.backward(tasks.losses(net(x), y), net).weights
        J, _, _ = brute_force(net, tasks, x, y)
        torch.testing.assert_close(J.T @ a.double(), J.T @ b.double(), atol=1e-9, rtol=0)  # d is unique
        opt.step()
    state = warm.state_dict()
    assert state["previous"].sum() == pytest.approx(1.0)
    clone = mk.methods.MGDA()
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.previous, warm.previous)
