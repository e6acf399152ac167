"""Front learning end to end on a two-task problem with a one-unit bottleneck (the tasks conflict:
the shared unit can serve one target or the other), for every approach."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlkit as mk
from mtlkit.core.preferences import circle_rays
from mtlkit.data.base import MultiTaskTensorDataset, loader
from mtlkit.errors import ConfigError, UnknownNameError
from mtlkit.methods.epo import non_uniformity
from mtlkit.pareto import APPROACHES, PreferenceSampler, evaluate_front, learn_front, pmtl_references

TASKS = mk.TaskSet([mk.Task("a", loss="mse", metrics=["mae"]), mk.Task("b", loss="mse", metrics=["mae"])])
OPTIONS = {"bottom_dims": [1], "tower_dims": [], "activation": "tanh"}
RAYS = circle_rays(7)


def data(n: int = 256, seed: int = 0) -> MultiTaskTensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([1.0, -1.0, 0.5, 0.0])
    return MultiTaskTensorDataset(x, {"a": x @ a, "b": x @ b})


def train_loader():
    return loader(data(), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def run(approach: str, epochs: int, **kw):
    return learn_front(
        approach,
        model="shared_bottom",
        in_features=4,
        tasks=TASKS,
        train_loader=train_loader(),
        epochs=epochs,
        model_options=OPTIONS,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.02),
        **kw,
    )


def test_every_approach_is_enrolled():
    assert set(APPROACHES) == {"cosmos", "phn_ls", "phn_epo", "ls", "epo", "pmtl"}


@pytest.mark.parametrize("approach", ["phn_ls", "ls"])
def test_a_larger_preference_gives_a_smaller_loss(approach):
    fit = run(approach, epochs=40, preferences=RAYS[::3])
    test = loader(data(seed=1), batch_size=256)
    front = fit.front(test, RAYS[::3] if fit.approach.conditioned else None)
    losses = front.losses()
    assert np.all(np.diff(losses[:, 0]) > 0)  # r_a falls along the rays: L_a rises ...
    assert np.all(np.diff(losses[:, 1]) < 0)  # ... and L_b falls
    # a real trade-off: the ends differ by a lot
    assert losses[-1, 0] > 2 * losses[0, 0] and losses[0, 1] > 2 * losses[-1, 1]


def test_cosmos_puts_the_loss_vector_on_the_preference_ray():
    fit = run("cosmos", epochs=40, alpha=1.2, method_options={"penalty": 8.0})
    front = fit.front(loader(data(seed=1), batch_size=256), RAYS)
    losses = front.losses()
    cosines = (
        (losses * RAYS.numpy()).sum(1) / np.linalg.norm(losses, axis=1) / np.linalg.norm(RAYS.numpy(), axis=1)
    )
    assert cosines.mean() > 0.9  # a point fixed at the equal-weight optimum scores about 0.87
    # the conditioning acts: the sweep spreads, and each end has its task's largest loss (the
    # cosine's sense: a larger r_k asks for a larger L_k)
    assert np.ptp(losses[:, 1]) > 0.5
    assert losses[:, 0].argmax() == 0 and losses[:, 1].argmax() == len(RAYS) - 1


def test_epo_models_end_near_their_rays():
    rays = RAYS[1::2]
    fit = run("epo", epochs=30, preferences=rays)
    front = fit.front(loader(data(seed=0), batch_size=256))
    for point in front.points:
        loss = torch.tensor([point.losses["a"], point.losses["b"]], dtype=torch.float64)
        assert float(non_uniformity(loss, torch.tensor(point.preference, dtype=torch.float64))) < 0.02


def test_pmtl_models_end_in_their_sub_regions():
    # reference vectors at 80, 65 and 50 degrees in loss space: sub-regions 72.5-87.5, 57.5-72.5 and
    # 42.5-57.5 degrees, all crossing this problem's front (about 37 to 86 degrees)
    theta = np.radians([80.0, 65.0, 50.0])
    inverse = 1.0 / np.stack([np.cos(theta), np.sin(theta)], axis=1)
    rays = torch.tensor(inverse / inverse.sum(1, keepdims=True))
    fit = run("pmtl", epochs=30, preferences=rays, method_options={"init_epochs": 2})
    losses = fit.front(loader(data(seed=0), batch_size=256)).losses()
    angles = np.degrees(np.arctan2(losses[:, 1], losses[:, 0]))
    # within 5 degrees of the sub-region (SGD noise keeps the iterates near its boundary)
    assert np.all(np.abs(angles - np.degrees(theta)) < 7.5 + 5.0), angles
    assert np.all(np.diff(angles) < 0)


def test_phn_epo_trains_and_sweeps():
    fit = run("phn_epo", epochs=10)
    front = fit.front(loader(data(seed=1), batch_size=256), RAYS)
    assert front.losses().shape == (7, 2) and np.isfinite(front.losses()).all()
    assert front.hypervolume([10.0, 10.0]) > 0


def test_pmtl_references_reverse_the_circle():
    u = torch.tensor(pmtl_references(circle_rays(5)), dtype=torch.float64)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(5, dtype=torch.float64))
    assert (u[:, 0].diff() > 0).all()  # r_a falls, so the allowed L_a grows


def test_bad_requests_are_clear_errors():
    with pytest.raises(UnknownNameError):
        run("cosmo", epochs=1)
    with pytest.raises(ConfigError):
        run("ls", epochs=0)
    fit = run("cosmos", epochs=1)
    with pytest.raises(ConfigError, match="preferences"):
        fit.front(loader(data(), batch_size=256))
    plain = mk.models.create("shared_bottom", in_features=4, tasks=TASKS, **OPTIONS)
    with pytest.raises(ConfigError, match="does not take a preference"):
        evaluate_front(plain, TASKS, loader(data(), batch_size=256), RAYS)
    trainer = mk.Trainer(
        plain, TASKS, "ew", callbacks=[PreferenceSampler()], progress=False, tensorboard=False
    )
    with pytest.raises(ConfigError, match="neither the model nor the method"):
        trainer.fit(train_loader(), epochs=1)


def test_the_sampler_resumes_its_draws():
    a, b = PreferenceSampler(alpha=0.5, seed=3), PreferenceSampler(alpha=0.5, seed=3)
    model = mk.models.create("pareto_hypernetwork", in_features=4, tasks=TASKS)
    trainer = mk.Trainer(model, TASKS, "ls", callbacks=[a], progress=False, tensorboard=False)
    batch = next(iter(train_loader()))
    a.on_train_batch_start(trainer, batch)
    b.load_state_dict(a.state_dict())
    a.on_train_batch_start(trainer, batch)
    b.on_train_batch_start(trainer, batch)
    torch.testing.assert_close(a.last, b.last)
    torch.testing.assert_close(trainer.method.preference_vector, a.last)
    torch.testing.assert_close(model.preference.double(), a.last)
