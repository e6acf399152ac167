"""ESMM and AITM: the CTCVR product, the calibrator, the funnel's gradient paths and checks."""

from __future__ import annotations

import itertools

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import TaskError
from mtlkit.models.funnel import product_logit

FUNNEL = mk.TaskSet([mk.Task("click", loss="bce"), mk.Task("buy", loss="bce")])
THREE = mk.TaskSet([mk.Task("view", loss="bce"), mk.Task("click", loss="bce"), mk.Task("buy", loss="bce")])


def test_product_logit_is_the_logit_of_the_product_and_stays_finite():
    a = torch.linspace(-30, 30, 61, dtype=torch.float64)[:, None]
    b = torch.linspace(-30, 30, 61, dtype=torch.float64)[None, :]
    got = product_logit(a, b)
    p = torch.sigmoid(a) * torch.sigmoid(b)
    ok = (p > 1e-12) & (p < 1 - 1e-9)
    torch.testing.assert_close(got[ok], torch.logit(p)[ok], atol=1e-8, rtol=1e-8)
    assert torch.isfinite(got).all()
    assert torch.isfinite(product_logit(torch.tensor([100.0]), torch.tensor([100.0]))).all()


def test_esmm_predicts_ctr_and_ctcvr_and_exposes_cvr():
    torch.manual_seed(0)
    model = mk.models.ESMM(5, FUNNEL).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    out = model(x)
    ctr = torch.sigmoid(out["click"])
    cvr = torch.sigmoid(model.conversion_rate(x))
    torch.testing.assert_close(torch.sigmoid(out["buy"]), ctr * cvr)
    assert (torch.sigmoid(out["buy"]) <= ctr).all()
    # the click task never reaches the CVR tower; the conversion task reaches both towers
    g = torch.autograd.grad(
        out["click"].sum(), list(model.cvr_tower.parameters()), allow_unused=True, retain_graph=True
    )
    assert all(v is None for v in g)
    g = torch.autograd.grad(out["buy"].sum(), list(model.ctr_tower.parameters()), allow_unused=True)
    assert all(v is not None and v.any() for v in g)
    assert list(model(x, task="click")) == ["click"]


def test_aitm_calibrator_and_transfer():
    torch.manual_seed(0)
    model = mk.models.AITM(5, THREE, tower_dropout=(0.0, 0.0, 0.0))
    x = torch.randn(32, 5)
    full = model(x, full_output=True)
    p = [torch.sigmoid(full.predictions[t]) for t in THREE.names]
    want = 0.6 * sum((b - a).clamp_min(0).mean() for a, b in itertools.pairwise(p))
    torch.testing.assert_close(full.aux_losses["aitm_calibrator"], want)
    # information flows forward only: the first step's loss never reaches later towers
    g = torch.autograd.grad(
        full.predictions["view"].sum(),
        list(model.towers["buy"].parameters()),
        allow_unused=True,
        retain_graph=True,
    )
    assert all(v is None for v in g)
    g = torch.autograd.grad(
        full.predictions["buy"].sum(), list(model.towers["view"].parameters()), allow_unused=True
    )
    assert all(v is not None for v in g)
    stats = model.routing_statistics()
    assert set(stats) == {"transfer/click", "transfer/buy"} and all(0 < v < 1 for v in stats.values())
    none = mk.models.AITM(5, THREE, calibration=0.0)
    assert none(x, full_output=True).aux_losses is None


def test_funnel_models_check_their_tasks():
    with pytest.raises(TaskError, match="exactly 2"):
        mk.models.ESMM(5, THREE)
    with pytest.raises(TaskError, match="bce"):
        mk.models.ESMM(5, mk.TaskSet([mk.Task("click", loss="bce"), mk.Task("buy", loss="mse")]))
    with pytest.raises(TaskError, match="one output"):
        mk.models.AITM(5, FUNNEL, out_features=2)
    with pytest.raises(TaskError, match="at least 2"):
        mk.models.AITM(5, ["click"])


def test_esmm_learns_cvr_from_the_entire_space_on_a_synthetic_funnel():
    # clicks and post-click conversions from known rates; ESMM never sees a CVR label, yet its
    # pCVR ranks the true conversion probability well (AUC well above chance)
    torch.manual_seed(0)
    n = 6000
    x = torch.randn(n, 5)
    ctr = torch.sigmoid(x[:, 0] + 0.5 * x[:, 1])
    cvr = torch.sigmoid(1.5 * x[:, 2] - 1.0)
    click = (torch.rand(n) < ctr).float()
    buy = click * (torch.rand(n) < cvr).float()
    model = mk.models.ESMM(5, FUNNEL, embed_dims=(32,), tower_dims=(16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = mk.Trainer(model, FUNNEL, "ew", optimizer, device="cpu", progress=False)
    batches = [
        (x[i : i + 500], {"click": click[i : i + 500, None], "buy": buy[i : i + 500, None]})
        for i in range(0, n, 500)
    ]
    for _ in range(15):
        for batch in batches:
            trainer.train_step(batch)
    model.eval()
    with torch.no_grad():
        score = model.conversion_rate(x).squeeze(1)
    truth = (torch.rand(n) < cvr).float()  # a fresh draw of conversion given a click
    pos, neg = score[truth == 1], score[truth == 0]
    auc = (pos[:, None] > neg[None, :]).double().mean()
    assert auc > 0.7


def test_product_logit_keeps_its_gradient_for_large_logits():
    a = torch.tensor([40.0, 60.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([40.0, 60.0], dtype=torch.float64)
    (g,) = torch.autograd.grad(product_logit(a, b).sum(), a)
    # d logit(p) / da = sigmoid(-a) / (1 - p) = 1/2 when a = b is large
    torch.testing.assert_close(g, torch.full((2,), 0.5, dtype=torch.float64))
