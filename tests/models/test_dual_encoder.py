"""The dual encoder: the fused coefficient step against cvxpy, exact task clusters, the shared
subspace recovered by the alternating fit, and the reduction to hard-sharing regression."""

from __future__ import annotations

import math

import pytest
import torch

import mtlkit as mk
from mtlkit.models.fused_coefficients import solve_fused_coefficients


@pytest.mark.parametrize("lambda_f", [0.01, 0.1, 1.0])
def test_the_admm_solution_matches_cvxpy(lambda_f):
    cp = pytest.importorskip("cvxpy")
    factors, targets = mk.data.clustered_coefficients()
    sol = solve_fused_coefficients(factors, targets, shared=3, lambda_f=lambda_f, lambda_r=0.01)
    betas = [cp.Variable(5) for _ in factors]
    offsets = [cp.Variable() for _ in factors]
    z, y = [f.numpy() for f in factors], [t.numpy() for t in targets]
    objective = sum(cp.sum_squares(y[k] - z[k] @ betas[k] - offsets[k]) / 80 for k in range(6))
    objective += 0.01 * sum(cp.sum_squares(b) for b in betas)
    objective += lambda_f * sum(
        cp.norm(betas[k][:3] - betas[m][:3], 2) for k in range(6) for m in range(k + 1, 6)
    )
    cp.Problem(cp.Minimize(objective)).solve()
    for k in range(6):
        assert torch.allclose(sol.coefficients[k], torch.tensor(betas[k].value), atol=5e-5)
        assert math.isclose(float(sol.intercepts[k]), float(offsets[k].value), abs_tol=5e-5)


def test_two_clusters_of_equal_shared_coefficients_fuse_into_exactly_two_groups():
    factors, targets = mk.data.clustered_coefficients()
    groups = {
        lam: solve_fused_coefficients(factors, targets, shared=3, lambda_f=lam, lambda_r=0.01).clusters
        for lam in (0.001, 0.05, 0.1, 0.2, 5.0)
    }
    assert groups[0.001] == [[k] for k in range(6)]  # almost no fusion: every task alone
    for lam in (0.05, 0.1, 0.2):  # a range of lambda_f: the two true clusters, exactly
        assert groups[lam] == [[0, 1, 2], [3, 4, 5]]
    assert groups[5.0] == [[0, 1, 2, 3, 4, 5]]  # strong fusion: one group


def test_rank_deficient_factors_are_refused_and_an_unconverged_solve_warns():
    g = torch.Generator().manual_seed(3)
    few = [torch.randn(3, 5, generator=g), torch.randn(40, 5, generator=g)]  # 3 samples, 5 factors
    targets = [torch.randn(3, generator=g), torch.randn(40, generator=g)]
    with pytest.raises(mk.errors.ConfigError, match="lambda_r > 0"):
        solve_fused_coefficients(few, targets, shared=2, lambda_f=0.1)
    solve_fused_coefficients(few, targets, shared=2, lambda_f=0.1, lambda_r=0.01)  # a ridge fixes it
    with pytest.warns(RuntimeWarning, match="ADMM iterations"):
        solve_fused_coefficients(few, targets, shared=2, lambda_f=0.1, lambda_r=0.01, iterations=2)


def test_training_recovers_the_shared_subspace():
    # task k's three outputs are M_k x with M_k = B_k A_s + u_k a_k^T: a 2-d shared factor space
    # (A_s) and one own direction per task (a_k), orthogonal to it. Encoders g (2-d) and f_k (1-d)
    # fit every task only if g spans the shared factors (each task needs 3 dimensions)
    data, tasks, a_s = mk.data.planted_factor_tasks(seed=0)
    torch.manual_seed(0)
    model = mk.models.DualEncoder(10, tasks, out_features=3, shared_dim=2, task_dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = mk.Trainer(model, tasks, "ew", optimizer, device="cpu", progress=False)
    trainer.fit(mk.data.loader(data, 200, shuffle=True), epochs=120)
    assert model.shared_angle(a_s) < 15.0  # the spec's threshold (observed 0.2 degrees)


def test_the_alternating_fit_fits_each_task_on_its_own_data():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, generator=g)
    data = {}
    for t, shift in (("a", 0.0), ("b", 2.0)):  # different P(X) per task
        x = torch.randn(300, 6, generator=g) + shift
        data[t] = (x, x @ w + (1.0 if t == "b" else 0.0) + 0.05 * torch.randn(300, generator=g))
    torch.manual_seed(0)
    model = mk.models.DualEncoder(6, ["a", "b"], shared_dim=3, task_dim=1)
    before = sum(float((model(x, task=t)[t].squeeze(1) - y).pow(2).mean()) for t, (x, y) in data.items())
    fit = mk.models.fit_alternating(model, data, lambda_f=0.05, outer=20, encoder_steps=20, lr=1e-2)
    after = sum(float((model(x, task=t)[t].squeeze(1) - y).pow(2).mean()) for t, (x, y) in data.items())
    assert after < 0.05 * before and fit.primal_residual < 1e-6


def test_column_targets_fit_as_vectors_and_mismatched_targets_are_refused():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 4, generator=g)
    y = x @ torch.randn(4, generator=g)
    fits = []
    for shape in ((80,), (80, 1)):  # (n, 1) targets once broadcast against (n,) predictions
        torch.manual_seed(0)
        model = mk.models.DualEncoder(4, ["a"], shared_dim=2, task_dim=1)
        mk.models.fit_alternating(model, {"a": (x, y.reshape(shape))}, lambda_f=0.0, outer=2, encoder_steps=5)
        fits.append(model.state_dict())
    for k in fits[0]:
        torch.testing.assert_close(fits[0][k], fits[1][k], atol=0, rtol=0)
    with pytest.raises(mk.errors.ShapeMismatchError, match="targets of shape"):
        mk.models.fit_alternating(model, {"a": (x, y[:70])}, lambda_f=0.0)
    with pytest.raises(mk.errors.ShapeMismatchError, match="targets of shape"):
        mk.models.fit_alternating(model, {"a": (x, torch.randn(80, 2))}, lambda_f=0.0)


def test_no_task_encoder_and_no_fusion_is_hard_sharing_regression():
    torch.manual_seed(0)
    model = mk.models.DualEncoder(6, ["a", "b"], shared_dim=3, task_dim=0)
    x = torch.randn(50, 6)
    y = {"a": x @ torch.randn(6), "b": x @ torch.randn(6)}
    fit = mk.models.fit_alternating(model, {t: (x, y[t]) for t in y}, lambda_f=0.0, outer=0, encoder_steps=0)
    g = model.shared(x).detach().double()
    for t in ("a", "b"):  # each head is the least-squares fit on the shared encoding
        design = torch.cat([g, torch.ones(50, 1, dtype=torch.float64)], dim=1)
        expected = torch.linalg.lstsq(design, y[t].double()[:, None]).solution[:, 0]
        head = model.heads[t]
        torch.testing.assert_close(head.weight[0].double(), expected[:3], atol=1e-4, rtol=0)
        torch.testing.assert_close(
            model(x, task=t)[t].squeeze(1).double(), design @ expected, atol=1e-4, rtol=0
        )
    assert fit.clusters == [[0], [1]]
    assert list(model.task_parameters()["a"]) == list(model.heads["a"].parameters())
