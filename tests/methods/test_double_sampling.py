"""SDMGrad and MoDo: their weight updates against direct re-derivations, their fixed points, and
three-batch steps end to end (cross Gramian of two batches, update on the third)."""

import numpy as np
import pytest
import torch

import mtlkit as mk
from mtlkit.methods.min_norm import min_norm_weights, project_simplex
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def bound(name, k, **options):
    method = mk.methods.create(name, **options)
    method.setup([f"t{i}" for i in range(k)])
    return method


def weights(method, gram):
    return method.weights(gram, torch.ones(len(gram), dtype=torch.float64))


def simplex_projection_reference(v):
    """Sort-based projection written out in numpy (Duchi et al., 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(v) + 1) > css - 1)[0][-1]
    return np.maximum(v - (css[rho] - 1) / (rho + 1), 0)


def test_sdmgrad_inner_loop_matches_a_direct_rederivation():
    gen = torch.Generator().manual_seed(0)
    J1, J2 = torch.randn(2, 4, 9, generator=gen, dtype=torch.float64)
    C = J1 @ J2.T
    method = bound("sdmgrad", 4, scale=1.0)
    out = weights(method, C)
    # numpy: s-normalised C, SGD with momentum 0.5 and lr 10, projection after each step
    c = C.numpy() / np.mean(np.sqrt(np.maximum(np.diag(C.numpy()), 0) + 1e-4)) ** 2
    w, buf = np.full(4, 0.25), None
    for _ in range(20):
        g = c @ (w + 0.3 / 4)
        buf = g if buf is None else 0.5 * buf + g
        w = simplex_projection_reference(w - 10 * buf)
    np.testing.assert_allclose(out.numpy(), (w + 0.3 / 4) / 1.3, atol=1e-12)
    np.testing.assert_allclose(method.previous.numpy(), w, atol=1e-12)  # kept for the next step


def test_sdmgrad_converges_to_the_direction_oriented_min_norm_point():
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    G = J @ J.T
    lam = 0.3
    method = bound("sdmgrad", 5, scale=1.0, n_iter=5000, lr=0.05, momentum=0.0)
    out = weights(method, G)
    w = method.previous
    b = G.mean(1)
    shifted = G + lam * (b[:, None] + b[None, :]) + lam**2 * G.mean()  # Gramian of g_k + lam g0
    reference = min_norm_weights(shifted)
    torch.testing.assert_close(J.T @ w, J.T @ reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, (w + lam / 5) / (1 + lam))


def test_sdmgrad_limits_and_one_task():
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    big = weights(bound("sdmgrad", 3, scale=1.0, lamda=1e6), J @ J.T)
    torch.testing.assert_close(big, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-5, rtol=0)
    mgda = weights(bound("sdmgrad", 3, scale=1.0, lamda=0.0, n_iter=5000, lr=0.05, momentum=0.0), J @ J.T)
    torch.testing.assert_close(J.T @ mgda, J.T @ min_norm_weights(J @ J.T), atol=1e-6, rtol=0)
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(weights(bound("sdmgrad", 1), g @ g.T), torch.ones(1, dtype=torch.float64))


def test_modo_one_step_formula_and_its_fixed_point():
    gen = torch.Generator().manual_seed(3)
    J1, J2 = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    method = bound("modo", 4, gamma=0.05)
    lam = weights(method, J1 @ J2.T)
    expected = simplex_projection_reference(
        np.full(4, 0.25) - 0.05 * ((J1 @ J2.T).numpy() @ np.full(4, 0.25) + 0.1 * 0.25)
    )
    np.testing.assert_allclose(lam.numpy(), expected, atol=1e-14)
    J = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    method = bound("modo", 4, gamma=0.01, rho=0.0)
    for _ in range(20_000):
        lam = weights(method, J @ J.T)
    torch.testing.assert_close(J.T @ lam, J.T @ min_norm_weights(J @ J.T), atol=1e-6, rtol=0)
    method = bound("modo", 3, rho=0.5)
    for _ in range(10):  # a zero Gramian: the regulariser keeps lambda at the centre
        lam = weights(method, torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(lam, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_project_simplex_is_exact():
    v = torch.tensor([0.9, -0.3, 0.6, 2.0], dtype=torch.float64)
    np.testing.assert_allclose(
        project_simplex(v).numpy(), simplex_projection_reference(v.numpy()), atol=1e-15
    )


def three_batches(k=3):
    tasks, net, x, y = make_problem(k=k)
    batches = [(x, y), *net.more_batches]
    return tasks, net, batches


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_three_batch_step_end_to_end(name):
    tasks, net, batches = three_batches()
    options = {"independent_batches": True} if name == "sdmgrad" else {}
    method = mk.methods.create(name, **options)
    assert method.batches_per_step == 3
    refs = [brute_force(net, tasks, x, y) for x, y in batches]  # (J, heads, losses) per batch
    (J3, heads3, _), (J1, heads1, _), (J2, heads2, _) = refs
    losses = [tasks.losses(net(x), y) for x, y in batches]
    info = method.backward(losses[0], net, extra_losses=losses[1:])
    cross = J1 @ J2.T
    torch.testing.assert_close(info.gramian, cross, atol=1e-12, rtol=1e-10)
    reference = bound(name, 3, **options)
    w = weights(reference, cross)
    direction = J3.T @ w
    if name == "sdmgrad":
        direction = direction * min(1.0, 1.0 / (float(direction.norm()) + 1e-6))
    torch.testing.assert_close(shared_grad(net), direction, atol=1e-10, rtol=1e-8)
    factor = 1 / 3 if name == "modo" else 1.0  # MoDo averages the heads, SDMGrad sums them
    for k, t in enumerate(tasks.names):
        for i, p in enumerate(net.task_parameters()[t]):
            expected = factor * (heads1[k][i] + heads2[k][i] + heads3[k][i])
            torch.testing.assert_close(p.grad, expected, atol=1e-10, rtol=1e-8)


def test_missing_extra_batches_are_an_error_before_anything_is_written():
    tasks, net, batches = three_batches()
    method = mk.methods.create("modo")
    with pytest.raises(mk.errors.LifecycleError, match="2 more batch"):
        method.backward(tasks.losses(net(batches[0][0]), batches[0][1]), net)
    assert all(p.grad is None for p in net.parameters())


def test_the_trainer_groups_three_batches_per_step(tmp_path):
    data = mk.data.load_mmoe_synthetic(n_train=224, n_val=32, n_test=32, dim=6, seed=1)
    model = mk.models.MMoE(6, data.tasks, num_experts=2, expert_dims=[8], tower_dims=[4])
    trainer = mk.Trainer(
        model,
        data.tasks,
        mk.methods.create("modo"),
        torch.optim.SGD(model.parameters(), lr=1e-2),
        device="cpu",
        progress=False,
        tensorboard=False,
    )
    trainer.fit(mk.data.loader(data.train, 32, shuffle=True), epochs=2)
    assert trainer.step == 2 * (7 // 3)  # 7 batches per epoch: two steps, one batch left over
