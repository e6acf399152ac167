"""DiBS-MTL: invariance to monotone loss transforms (where MGDA and linear scalarisation fail), the
one-step closed form, the multi-step loop against a direct re-implementation of the official one,
the early exit, K = 1, zero and extreme-scale gradients."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.methods.dibs_mtl import DiBSMTL, dibs_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import assert_same_grads, grads, shared_grad


def official_loop(J, radius, step, steps):
    """The official multi-step inner loop on explicit vectors (numpy, no epsilon)."""
    J = np.asarray(J, dtype=np.float64)
    norms = np.linalg.norm(J, axis=1)
    units = J / norms[:, None]
    preferred = -radius * units
    delta = np.zeros(J.shape[1])
    betas = []
    for _ in range(steps):
        dist = np.linalg.norm(delta[None, :] - preferred, axis=1)
        betas.append(step * dist / norms)
        new = delta - step * (dist[:, None] * units).sum(0)
        if np.linalg.norm(new) > radius:
            break
        delta = new
    return np.sum(betas, axis=0), betas


def method_weights(J, **options):
    method = DiBSMTL(**options)
    method.setup([f"t{i}" for i in range(len(J))])
    return method.weights(J @ J.T, torch.ones(len(J), dtype=torch.float64))


# -- invariance: the test, end to end --------------------------------------------------------
TRANSFORMS = {
    "identity": lambda v: v,
    "exp": torch.exp,
    "cube": lambda v: v**3,
}


def step_grads(name, transforms, options=None):
    """Shared and all gradients of one step of method ``name`` for each list of per-task loss
    transforms, on one fixed problem (seed 1: every task has a sizeable gradient and MGDA's
    min-norm point is inside the simplex, so MGDA's invariance is not an accident of a vertex)."""
    torch.manual_seed(1)
    tasks, net, x, y = make_problem(k=3)
    runs = []
    for per_task in transforms:
        net.zero_grad(set_to_none=True)
        out = net(x, full_output=True)
        losses = tasks.losses(out.predictions, y)
        losses = {t: per_task[i](v) for i, (t, v) in enumerate(losses.items())}
        info = mk.methods.create(name, **(options or {})).backward(losses, net, out)
        runs.append((shared_grad(net).clone(), grads(net), info.weights))
    return runs


MIXED = [
    [TRANSFORMS["identity"]] * 3,
    [TRANSFORMS["exp"]] * 3,
    [TRANSFORMS["cube"]] * 3,
    [TRANSFORMS["exp"], TRANSFORMS["cube"], TRANSFORMS["identity"]],  # a different h_k per task
]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"steps": 5, "radius": 0.3},
        {"steps": 4, "radius": 2.0, "step_size": 0.4},
        {"level": "representation"},
    ],
)
def test_dibs_update_is_invariant_to_monotone_nonaffine_loss_transforms(options):
    runs = step_grads("dibs_mtl", MIXED, options)
    for shared, every, _ in runs[1:]:
        torch.testing.assert_close(shared, runs[0][0], atol=0, rtol=1e-9)
        assert_same_grads(every, runs[0][1], atol=1e-15, rtol=1e-9)  # heads (weighted) too


def test_dibs_clipped_update_is_invariant_and_mgda_and_linear_scalarisation_are_not():
    # scale='unit' makes the update the sum of unit gradients (norm > 1 here): the official clip to
    # max_norm=1.0 is active, and the whole clipped shared gradient is still the same
    runs = step_grads("dibs_mtl", MIXED, {"scale": "unit"})
    assert abs(runs[0][0].norm().item() - 1.0) < 1e-5
    for shared, every, _ in runs[1:]:
        torch.testing.assert_close(shared, runs[0][0], atol=0, rtol=1e-9)
        assert_same_grads(every, runs[0][1], atol=1e-15, rtol=1e-9)
    for name in ("mgda", "ew"):
        other = step_grads(name, MIXED)
        if name == "mgda":
            assert (other[0][2] > 0.1).all()  # an interior min-norm point on the raw losses
        base = other[0][0] / other[0][0].norm()
        for shared, _, _ in other[1:]:
            cosine = float(shared @ base / shared.norm())
            assert cosine < 1 - 1e-3, (name, cosine)  # not even the direction survives


# -- the paper's and the spec's identities ------------------------------------------------------------
def test_one_step_closed_form_and_orthogonal_unit_gradients():
    J = torch.randn(4, 9, dtype=torch.float64) * torch.tensor(
        [[1e-3], [1.0], [7.0], [1e3]], dtype=torch.float64
    )
    w = method_weights(J)
    norms = J.norm(dim=1)
    torch.testing.assert_close(
        w * norms, torch.full((4,), 1e-2 * 1e-3, dtype=torch.float64), atol=0, rtol=1e-12
    )
    g = torch.eye(2, 5, dtype=torch.float64)  # two orthogonal unit-norm gradients
    d = g.T @ method_weights(g, radius=0.5)
    torch.testing.assert_close(d, 1e-2 * 0.5 * (g[0] + g[1]), atol=1e-15, rtol=0)
    torch.testing.assert_close(d / d.norm(), (g[0] + g[1]) / 2**0.5, atol=1e-15, rtol=0)


@given(
    k=st.integers(1, 6),
    dim=st.integers(1, 8),
    steps=st.integers(1, 7),
    radius=st.sampled_from([1e-3, 0.2, 1.0, 4.0]),
    step=st.sampled_from([1e-2, 0.1, 0.45]),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=80, deadline=None)
def test_gramian_only_loop_matches_the_official_vector_loop(k, dim, steps, radius, step, seed):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(k, dim, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(k, 1, generator=gen))
    w, betas = dibs_weights(J @ J.T, radius, step, steps, with_betas=True)
    ref, ref_betas = official_loop(J.numpy(), radius, step, steps)
    assert len(betas) == len(ref_betas)  # same early exit
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-9, atol=0)
    c = torch.exp(torch.randn(k, generator=gen, dtype=torch.float64) * 3)  # g_k -> c_k g_k
    w_scaled = dibs_weights((c[:, None] * J) @ (c[:, None] * J).T, radius, step, steps)
    torch.testing.assert_close(
        J.T @ w, (c[:, None] * J).T @ w_scaled, atol=1e-14 * float(w.abs().max()), rtol=1e-9
    )


def test_early_exit_keeps_the_betas_of_the_step_that_leaves_the_ball():
    J = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)  # nearly aligned: delta runs away
    w, betas = dibs_weights(J @ J.T, 1.0, 0.3, 10, with_betas=True)
    ref, ref_betas = official_loop(J.numpy(), 1.0, 0.3, 10)
    assert 1 < len(betas) == len(ref_betas) < 10
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-12)


def test_multi_step_gives_more_say_to_the_task_farther_from_delta():
    # unit gradients: tasks 0 and 1 close together, task 2 at an obtuse angle to both
    angles = torch.tensor([0.0, 0.3, 2.2], dtype=torch.float64)
    J = torch.stack([angles.cos(), angles.sin()], dim=1)
    radius, step = 1.0, 0.2
    _, betas = dibs_weights(J @ J.T, radius, step, 2, with_betas=True)
    assert len(betas) == 2
    torch.testing.assert_close(betas[0], torch.full((3,), step * radius, dtype=torch.float64))
    delta = -step * radius * J.sum(0)  # after step 1 (every d_k = r)
    dist = (delta[None, :] + radius * J).norm(dim=1)
    torch.testing.assert_close(betas[1], step * dist, atol=1e-15, rtol=0)
    assert dist[2] > dist[0] and dist[2] > dist[1]  # task 2's preferred point is the farthest ...
    assert betas[1][2] > betas[1][0] and betas[1][2] > betas[1][1]  # ... so it gets the largest beta


def test_official_defaults_and_inner_steps():
    method = mk.methods.create("dibs_mtl")
    assert (method.steps, method.radius, method.max_norm, method.head_grad, method.level) == (
        1,
        1e-3,
        1.0,
        "weighted",
        "parameter",
    )
    assert method.inner_step() == 1e-2
    assert DiBSMTL(steps=5, radius=0.1).inner_step() == pytest.approx(0.02)  # official multi-step: r/5
    assert DiBSMTL(steps=5, step_size=0.3).inner_step() == 0.3


# -- degenerate inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 6])
def test_a_zero_gradient_gets_weight_zero_and_leaves_the_others_alone(steps):
    J = torch.randn(3, 5, dtype=torch.float64)
    with_zero = torch.cat([J[:1], torch.zeros(1, 5, dtype=torch.float64), J[1:]])
    w = dibs_weights(with_zero @ with_zero.T, 0.7, 0.1, steps)
    assert torch.isfinite(w).all() and w[1] == 0
    torch.testing.assert_close(w[[0, 2, 3]], dibs_weights(J @ J.T, 0.7, 0.1, steps), atol=0, rtol=1e-12)
    zero = torch.zeros(1, 5, dtype=torch.float64)
    assert torch.equal(dibs_weights(zero @ zero.T, 1e-3, 1e-2, steps), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("steps", [1, 5])
def test_duplicated_and_opposite_tasks_and_extreme_scales(steps):
    g = torch.randn(6, dtype=torch.float64)
    J = torch.stack([g, g, -g])
    w = dibs_weights(J @ J.T, 0.5, 0.05, steps)
    assert torch.isfinite(w).all() and (w > 0).all()
    assert w[0] == w[1]
    J = torch.randn(4, 7, dtype=torch.float64)
    d = J.T @ dibs_weights(J @ J.T, 0.5, 0.05, steps)
    for scale in (1e-8, 1e8):
        Js = J * scale
        ws = dibs_weights(Js @ Js.T, 0.5, 0.05, steps)
        assert torch.isfinite(ws).all()
        torch.testing.assert_close(Js.T @ ws, d, atol=0, rtol=1e-10)


@pytest.mark.parametrize("steps", [1, 3])
def test_one_task_end_to_end_is_the_scaled_unit_gradient(steps):
    tasks, net, x, y = make_problem(k=1)
    J, _, _ = brute_force(net, tasks, x, y)
    method = DiBSMTL(steps=steps, radius=0.01)
    info = method.backward(tasks.losses(net(x), y), net)
    w_ref, _ = official_loop(J.numpy(), 0.01, method.inner_step(), steps)
    torch.testing.assert_close(info.weights, torch.from_numpy(w_ref), atol=0, rtol=1e-10)
    torch.testing.assert_close(shared_grad(net), J[0] * float(w_ref[0]), atol=1e-15, rtol=1e-10)
    if steps == 1:
        torch.testing.assert_close(shared_grad(net), 1e-2 * 0.01 * J[0] / J[0].norm(), atol=1e-15, rtol=1e-10)


def test_end_to_end_matches_brute_force_with_clipping_and_missing_labels():
    tasks, net, x, y = make_problem(k=4)
    y["t2"] = torch.full_like(y["t2"], float("nan"))
    J, _, _ = brute_force(net, tasks, x, y)
    active = [0, 1, 3]
    method = DiBSMTL(steps=5, radius=1.5, step_size=0.5, scale=3.0)
    info = method.backward(tasks.losses(net(x), y), net)
    ref, _ = official_loop(J[active].numpy(), 1.5, 0.5, 5)
    w = np.zeros(4)
    w[active] = 3.0 * ref
    torch.testing.assert_close(info.weights, torch.from_numpy(w), atol=0, rtol=1e-10)
    d = J.T @ torch.from_numpy(w)
    assert d.norm() > 1.0  # the official clip to max_norm=1.0 is active
    torch.testing.assert_close(shared_grad(net), d / (d.norm() + 1e-6), atol=1e-12, rtol=0)
