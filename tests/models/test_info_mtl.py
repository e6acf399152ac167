"""InfoMTL: the KL identity, the compression term masked to each task's labelled samples, the
spec's SIMax sign test (input relevance helps a held-out task, a shared bottleneck hurts it) and
the issue's bottleneck test (a probe recovers less of a nuisance variable from a task's
representation while the task's accuracy holds)."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.data import MultiTaskTensorDataset
from mtlkit.metrics.embedding_probe import linear_probe_accuracy
from mtlkit.models.info_mtl import gaussian_kl

TASKS = mk.TaskSet(
    [mk.Task("a", loss="bce", metrics=["accuracy"]), mk.Task("b", loss="bce", metrics=["accuracy"])]
)
WEIGHTS = torch.randn(3, 8, generator=torch.Generator().manual_seed(99))


def blocks(n, seed):
    """Inputs of three 8-wide blocks; task y_i is the sign of a linear function of block i."""
    x = torch.randn(n, 24, generator=torch.Generator().manual_seed(seed))
    return x, [(x[:, 8 * i : 8 * i + 8] @ WEIGHTS[i] > 0).float() for i in range(3)]


def train(seed, epochs, **options):
    x, y = blocks(4000, 0)
    torch.manual_seed(seed)
    model = mk.models.InfoMTL(24, TASKS, **options)
    trainer = mk.Trainer(model, TASKS, "ew", device="cpu", progress=False, seed=seed)
    data = MultiTaskTensorDataset(x, {"a": y[0], "b": y[1]})
    trainer.fit(mk.data.with_label_masks(mk.data.loader(data, 128, shuffle=True), TASKS), epochs=epochs)
    return model.eval()


def probe(features_train, features_test, label_train, label_test):
    z = torch.cat([features_train, features_test])
    idx = torch.arange(len(z))
    labels = torch.cat([label_train, label_test]).long()
    return linear_probe_accuracy(z, labels, idx[: len(features_train)], idx[len(features_train) :])


def test_kl_identity():
    zero = torch.zeros(3, 4)
    assert torch.equal(gaussian_kl(zero, zero), torch.zeros(3))
    m = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    assert float(gaussian_kl(m, torch.zeros(1, 4))) == pytest.approx(float(m.pow(2).sum() / 2))


def test_the_compression_term_counts_only_the_tasks_labelled_samples():
    torch.manual_seed(0)
    model = mk.models.InfoMTL(6, TASKS, encoder_dims=(8,), latent_dim=3, alpha=0.0, beta=0.5, dropout=0.0)
    x = torch.randn(5, 6)
    labelled = {"a": torch.tensor([True, False, True, False, False]), "b": torch.ones(5, dtype=torch.bool)}
    torch.manual_seed(1)
    out = model({"x": x, "labelled": labelled}, full_output=True)
    mu, logvar = model.posteriors["a"](model.encoder(x)).chunk(2, dim=-1)
    kl = gaussian_kl(mu, logvar.clamp(-10, 10))
    torch.testing.assert_close(out.aux_losses["compression/a"], 0.5 * kl[labelled["a"]].mean())
    model.eval()
    assert model(x, full_output=True).aux_losses is None  # regularisers in training only


def test_input_relevance_keeps_information_a_held_out_task_needs():
    x, y = blocks(4000, 0)
    xt, yt = blocks(2000, 1)
    scores = {}
    for alpha in (0.5, 0.0, -0.5):
        model = train(0, 10, encoder_dims=(64, 8), alpha=alpha, beta=1e-3, dropout=0.1)
        with torch.no_grad():
            scores[alpha] = probe(model.encoder(x), model.encoder(xt), y[2], yt[2])
    assert scores[0.5] > scores[0.0] > scores[-0.5]  # SIMax helps; a shared-level bottleneck hurts


def test_the_task_bottleneck_drops_a_nuisance_variable_and_keeps_the_task():
    x, y = blocks(4000, 0)
    xt, yt = blocks(2000, 1)
    results = {}
    for beta in (0.0, 0.03):
        model = train(0, 10, encoder_dims=(64, 32), latent_dim=16, alpha=0.0, beta=beta, dropout=0.0)
        with torch.no_grad():
            mu = lambda v, m=model: m.posteriors["a"](m.encoder(v)).chunk(2, dim=-1)[0]  # noqa: E731
            accuracy = float(((model(xt)["a"].squeeze(-1) > 0).float() == yt[0]).float().mean())
            nuisance = probe(mu(x), mu(xt), y[1], yt[1])  # task b's variable, read from task a's Z_a
        results[beta] = (accuracy, nuisance)
    assert results[0.03][1] < results[0.0][1] - 0.15
    assert results[0.03][0] > results[0.0][0] - 0.02
