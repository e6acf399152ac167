"""The ADH-MTL reconstruction on its synthetic cohort: the decomposition identities, the grouping,
group-level models for new patients, the dependency prior for a scarce task, the prior's limit."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk


def _trained(cohort: mk.data.Cohort, groups: int, epochs: int = 15, **options) -> mk.models.ADHMTL:
    torch.manual_seed(0)
    width = cohort.data.inputs.shape[1]
    model = mk.models.ADHMTL(
        width, cohort.tasks, summary_dim=cohort.summary_dim, num_groups=groups, hidden_dims=(), **options
    )
    if groups > 1:
        model.fit_groups(cohort.summaries(cohort.train_patients))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    trainer = mk.Trainer(model, cohort.tasks, "ew", optimizer, device="cpu", progress=False)
    trainer.fit(mk.data.loader(cohort.rows(cohort.train_patients), 256, shuffle=True), epochs=epochs)
    return model.eval()


def _bce(model: mk.models.ADHMTL, data: mk.data.MultiTaskTensorDataset, task: str) -> float:
    with torch.no_grad():
        logits = model(data.inputs, task=task)[task].squeeze(1)
    y = data.targets[task]
    keep = ~torch.isnan(y)
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], y[keep]))


def test_the_decomposition_reduces_to_per_task_and_per_group_models():
    torch.manual_seed(0)
    model = mk.models.ADHMTL(6, ["a", "b"], summary_dim=2, num_groups=3, hidden_dims=())
    with pytest.raises(mk.errors.ConfigError, match="fit_groups"):  # no centroids yet
        model(torch.randn(3, 6))
    model.set_centroids(torch.tensor([[-5.0, 0.0], [0.0, 0.0], [5.0, 0.0]]))
    with torch.no_grad():
        for part in model.task_parts.values():
            part.full.normal_()
    x = torch.randn(3, 6)
    x[:, :2] = model.centroids  # one row per group, the same features otherwise
    x[:, 2:] = x[0, 2:]
    out = model(x)  # U_g = 0: every group gets the same per-task prediction
    assert all(torch.allclose(out[t], out[t][0].expand_as(out[t])) for t in out)
    with torch.no_grad():
        model.group_part.full.normal_()
        for part in model.task_parts.values():
            part.full.zero_()
    out = model(x)  # V_d = 0: one predictor per group, shared by the tasks
    assert torch.allclose(out["a"], out["b"]) and not torch.allclose(
        out["a"], out["a"][0].expand_as(out["a"])
    )
    torch.testing.assert_close(model.predictor(1, "a"), model.w0 + model.group_part.full[1])


def test_group_models_serve_new_patients_better_than_one_global_model():
    cohort = mk.data.adh_cohort(patients=300, seed=0)
    held_out = cohort.rows(cohort.test_patients)
    grouped, single = _trained(cohort, groups=3), _trained(cohort, groups=1)
    # the groups found on the training patients are the latent ones (up to their names)
    first = torch.stack([cohort.data.inputs[cohort.patient == p][0] for p in cohort.test_patients.tolist()])
    found = grouped.groups_of(first)
    truth = torch.stack([cohort.group[cohort.patient == p][0] for p in cohort.test_patients.tolist()])
    purity = sum(int(torch.bincount(truth[found == k]).max()) for k in found.unique()) / len(found)
    assert purity > 0.95
    for t in cohort.tasks.names:
        assert _bce(grouped, held_out, t) < _bce(single, held_out, t) - 0.05


def test_the_dependency_prior_helps_a_task_with_scarce_labels():
    # the last disease is assessed for 1% of the patients; its component is the mean of the first
    # two diseases' in truth. Scored on every held-out patient's labels (the same cohort, all assessed)
    deps = torch.zeros(4, 4)
    deps[3, 0] = deps[3, 1] = 0.5
    gains = []
    for seed in (1, 2, 3):
        cohort = mk.data.adh_cohort(patients=300, scarce=0.01, seed=seed)
        full = mk.data.adh_cohort(patients=300, assessed=1.0, seed=seed)
        held_out = full.rows(full.test_patients)
        with_prior = _trained(cohort, groups=3, lambda_d=0.03, dependencies=deps)
        without = _trained(cohort, groups=3, lambda_d=0.03)
        gains.append(_bce(without, held_out, "disease3") - _bce(with_prior, held_out, "disease3"))
    assert min(gains) > 0 and sum(gains) / 3 > 0.02  # observed 0.005, 0.024, 0.050


def test_a_strong_prior_without_dependencies_collapses_the_task_components():
    cohort = mk.data.adh_cohort(patients=100, seed=2)
    model = _trained(cohort, groups=3, epochs=5, lambda_d=1e4)
    # Adam's normalised steps leave an oscillation of the order of its learning rate (0.05) around 0
    assert max(float(p.full.detach().abs().max()) for p in model.task_parts.values()) < 0.02
    assert float(model.group_part.full.abs().max()) > 0.1  # the group components still learn
