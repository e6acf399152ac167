"""The preference methods (EPO, PMTL, COSMOS, linear scalarisation): their optimality conditions on
a problem with a known front, agreement with a reference LP solver, and exact gradients."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError
from mtlkit.methods import Hook
from mtlkit.methods.cosmos import cosmos_weights
from mtlkit.methods.epo import epo_direction, non_uniformity
from mtlkit.methods.pmtl import active_constraints, circle_references
from mtlkit.methods.preferences import PreferenceMethod

A, B = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)


def losses_at(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two quadratics whose Pareto set is the segment from A to B (offset so both stay positive)."""
    return {"f1": ((x - A) ** 2).sum() + 0.5, "f2": ((x - B) ** 2).sum() + 0.5}


def descend(method, steps: int = 600, lr: float = 0.02, epoch: int = 50, start=(2.5, -1.5)) -> torch.Tensor:
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    method.setup(["f1", "f2"])
    epochs = Hook.EPOCH_END in method.hooks
    for step in range(steps):
        if epochs and step % epoch == 0:
            method.begin_epoch()
        x.grad = None
        method.backward(losses_at(x), shared=[x])
        with torch.no_grad():
            x -= lr * x.grad
        if epochs and step % epoch == epoch - 1:
            method.on_epoch_end()
    return x.detach()


def distance_to_front(x: torch.Tensor) -> float:
    t = float(((x - A) @ (B - A)) / ((B - A) @ (B - A)))
    return float((x - (A + min(max(t, 0.0), 1.0) * (B - A))).norm())


@functools.cache
def epo_solution(preference: tuple[float, float], eps: float) -> torch.Tensor:
    return descend(mk.methods.create("epo", preference=list(preference), eps=eps), steps=400, lr=0.03)


@pytest.mark.parametrize("preference", [(0.2, 0.8), (0.5, 0.5), (0.7, 0.3)])
def test_epo_reaches_the_preferred_point_of_the_front(preference: tuple[float, float]) -> None:
    r = torch.tensor(preference, dtype=torch.float64)
    for eps, rtol in [(1e-4, 3e-2), (1e-9, 2e-4)]:  # balanced to within eps, then descent
        x = epo_solution(preference, eps)
        f = torch.stack(list(losses_at(x).values()))
        assert distance_to_front(x) < 1e-3  # Pareto optimal
        assert float(non_uniformity(f, r)) <= eps * 1.01  # r_1 f_1 = r_2 f_2, up to eps
        torch.testing.assert_close(r[0] * f[0], r[1] * f[1], rtol=rtol, atol=0)


def test_epo_larger_preference_means_smaller_loss() -> None:
    low, high = epo_solution((0.2, 0.8), 1e-4), epo_solution((0.7, 0.3), 1e-4)
    assert losses_at(high)["f1"] < losses_at(low)["f1"]


def _lp_reference(c: np.ndarray, ca: np.ndarray, rl: np.ndarray, descent: bool) -> float:
    cp = pytest.importorskip("cvxpy")
    m = len(ca)
    alpha = cp.Variable(m)
    cons = [alpha >= 0, cp.sum(alpha) == 1]
    if descent:
        cons += [c @ alpha >= 0, alpha @ ca >= min(0.0, float(ca.max()))]
        objective = cp.sum(c @ alpha)
    else:
        up = ca > 0
        rhs = ca.copy()
        if up.any():
            top = rl == rl.max()
            rhs[top] = 0.0
            keep = ~up | top
        else:
            rhs[:] = 0.0
            keep = np.ones(m, dtype=bool)
        cons += [c[keep] @ alpha >= rhs[keep]]
        objective = alpha @ ca
    problem = cp.Problem(cp.Maximize(objective), cons)
    problem.solve(solver=cp.CLARABEL)
    return float(problem.value)


@pytest.mark.parametrize("seed", range(12))
def test_epo_lp_agrees_with_cvxpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(2, 6))
    jac = rng.normal(size=(m, 7))
    c = jac @ jac.T
    losses = rng.uniform(0.1, 2.0, m)
    r = rng.dirichlet(np.ones(m))
    if seed % 3 == 0:  # on the ray: the descent mode
        losses = (1.0 / r) * 0.3
    eps = 1e-4
    alpha, descent, mu = epo_direction(
        torch.from_numpy(c), torch.from_numpy(losses), torch.from_numpy(r), eps
    )
    assert alpha is not None and descent == (mu <= eps)
    assert float(alpha.sum()) == pytest.approx(1.0) and bool((alpha >= 0).all())
    share = r * losses / (r * losses).sum()
    adjustment = r * (np.log(m * share) - mu)
    ca = c @ adjustment
    value = float(c.sum(axis=0) @ alpha.numpy()) if descent else float(ca @ alpha.numpy())
    assert value == pytest.approx(_lp_reference(c, ca, r * losses, descent), rel=1e-6, abs=1e-8)
    ca_alpha = c @ alpha.numpy()
    if descent:  # no task's loss rises to first order
        assert (ca_alpha >= -1e-9).all()
    else:  # the task furthest above the ray never rises
        assert (ca_alpha[r * losses == (r * losses).max()] >= -1e-9).all()


def test_non_uniformity_is_zero_exactly_on_the_ray() -> None:
    r = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert float(non_uniformity(torch.tensor([3.0, 1.0], dtype=torch.float64), r)) == pytest.approx(
        0.0, abs=1e-15
    )
    assert float(non_uniformity(torch.tensor([1.0, 1.0], dtype=torch.float64), r)) > 0.1


@functools.cache
def pmtl_solution(index: int) -> torch.Tensor:
    return descend(mk.methods.create("pmtl", index=index, init_epochs=2), steps=800, lr=0.02)


@pytest.mark.parametrize("index", range(5))
def test_pmtl_ends_pareto_optimal_in_its_sub_region(index: int) -> None:
    x = pmtl_solution(index)
    f = torch.stack(list(losses_at(x).values()))
    assert distance_to_front(x) < 1e-3
    refs = circle_references(5)
    # inside the sub-region of u_index: no other reference vector is closer in angle (up to round-off)
    slack = (refs - refs[index]) @ (f / f.norm())
    assert float(slack.max()) < 2e-3


def test_pmtl_sub_regions_order_the_solutions() -> None:
    firsts = [float(losses_at(pmtl_solution(k))["f1"]) for k in range(5)]
    assert firsts == sorted(firsts, reverse=True)  # u_0 = (1, 0) allows the largest f1


def test_pmtl_initialisation_descends_only_the_violated_constraints() -> None:
    refs = circle_references(5)
    losses = torch.tensor([0.2, 3.0], dtype=torch.float64)  # far towards task 2: violates index 0's region
    rows = active_constraints(refs, 0, losses)
    assert len(rows) == 4  # every other vector is closer in angle
    method = mk.methods.create("pmtl", index=0)
    method.setup(["f1", "f2"])
    method.active_index = None
    w = method.weights(torch.eye(2, dtype=torch.float64), losses)
    # task 2 is pushed down and task 1 allowed to rise (an ascent), with unnormalised weights
    assert float(w[0]) < 0 < float(w[1])
    assert float(w.abs().sum()) < 1.0
    torch.testing.assert_close(w, rows.T @ mk.methods.min_norm_weights(rows @ rows.T))


def test_cosmos_weights_are_the_loss_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        losses = torch.rand(3, dtype=torch.float64, generator=gen) + 0.05
        r = torch.rand(3, dtype=torch.float64, generator=gen)
        r = r / r.sum()
        leaf = losses.clone().requires_grad_(True)
        total = (r * leaf).sum() - 2.0 * torch.nn.functional.cosine_similarity(r, leaf, dim=0)
        (expected,) = torch.autograd.grad(total, leaf)
        torch.testing.assert_close(cosmos_weights(losses, r, 2.0), expected, rtol=1e-12, atol=1e-12)


def test_cosmos_step_gradient_matches_its_loss() -> None:
    x = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    method = mk.methods.create("cosmos", penalty=2.0)
    method.setup(["f1", "f2"])
    method.set_preference([0.3, 0.7])
    method.backward(losses_at(x), shared=[x])
    got = x.grad.clone()
    f = torch.stack(list(losses_at(x).values()))
    r = torch.tensor([0.3, 0.7], dtype=torch.float64)
    (expected,) = torch.autograd.grad(
        (r * f).sum() - 2.0 * torch.nn.functional.cosine_similarity(r, f, dim=0), x
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_linear_scalarization_weights_are_the_preference() -> None:
    method = mk.methods.create("ls", preference=[1.0, 3.0])
    method.setup(["f1", "f2"])
    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    info = method.backward(losses_at(x), shared=[x])
    torch.testing.assert_close(info.weights.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))


@pytest.mark.parametrize("name", ["epo", "cosmos", "ls"])
def test_preference_methods_take_a_preference_and_keep_it_in_their_state(name: str) -> None:
    method = mk.methods.create(name)
    assert isinstance(method, PreferenceMethod)
    method.setup(["f1", "f2"])
    method.set_preference(torch.tensor([1.0, 4.0]))
    state = method.state_dict()
    other = mk.methods.create(name)
    other.setup(["f1", "f2"])
    other.load_state_dict(state)
    torch.testing.assert_close(other.preference_vector, torch.tensor([0.2, 0.8], dtype=torch.float64))
    with pytest.raises(ConfigError):
        method.set_preference([1.0, 1.0, 1.0])
    with pytest.raises(ConfigError):
        method.set_preference([1.0, math.nan])


def test_pmtl_checks_its_references() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        mk.methods.create("pmtl", index=5).setup(["f1", "f2"])
    with pytest.raises(ConfigError, match="entries"):
        mk.methods.create("pmtl", references=[[1.0, 0.0, 0.0]]).setup(["f1", "f2"])
