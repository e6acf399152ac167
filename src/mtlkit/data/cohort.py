"""A synthetic patient cohort with double heterogeneity (diseases and patient groups differ), the
test bed of ADH-MTL-style models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import MultiTaskTensorDataset
from mtlkit.errors import ConfigError


@dataclass
class Cohort:
    """Samples of patients; every row is one sample of one patient.

    ``data``'s inputs are ``[patient summary (summary_dim); sample features (features)]``: the
    summary is the same for all of a patient's samples (what a group assignment may read). Missing
    assessments are NaN labels. ``patient``, ``group`` (latent, for evaluation only) per row;
    ``train_patients``/``test_patients`` split the patients (the test ones are "new" patients).
    """

    data: MultiTaskTensorDataset
    tasks: TaskSet
    patient: Tensor
    group: Tensor
    train_patients: Tensor
    test_patients: Tensor
    summary_dim: int

    def summaries(self, patients: Tensor) -> Tensor:
        """One summary row per patient of ``patients`` (what a group assignment is fitted on)."""
        first = torch.stack([self.data.inputs[self.patient == p][0] for p in patients.tolist()])
        return first[:, : self.summary_dim]

    def rows(self, patients: Tensor) -> MultiTaskTensorDataset:
        """The samples of ``patients``."""
        keep = torch.isin(self.patient, patients)
        targets = {t: v[keep] for t, v in self.data.targets.items()}
        return MultiTaskTensorDataset(self.data.inputs[keep], targets)


def adh_cohort(
    patients: int = 300,
    samples: int = 10,
    groups: int = 3,
    diseases: int = 4,
    features: int = 8,
    summary_dim: int = 4,
    assessed: float = 0.7,
    scarce: float | None = None,
    test_share: float = 0.2,
    seed: int = 0,
) -> Cohort:
    """``patients`` patients in ``groups`` latent groups (their summaries cluster by group), each with
    ``samples`` samples of ``features`` sensor features; disease d's label is Bernoulli with logit
    ``x . (w_0 + u_g + v_d)``, so the mapping differs by disease and by the patient's group. The last
    disease depends on the first two: ``v_last = (v_0 + v_1) / 2`` (a dependency a prior can use).
    Each patient is assessed on each disease with probability ``assessed`` (else NaN labels); with
    ``scarce`` the last disease is assessed with that probability instead. ``test_share`` of the
    patients are held out as new patients."""
    if groups < 1 or diseases < 3 or not 0 < assessed <= 1 or not 0 < test_share < 1:
        raise ConfigError(
            "adh_cohort needs groups >= 1, diseases >= 3, 0 < assessed <= 1, 0 < test_share < 1."
        )
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(features, generator=g)
    u = 1.5 * torch.randn(groups, features, generator=g)
    v = torch.randn(diseases, features, generator=g)
    v[-1] = (v[0] + v[1]) / 2
    centres = 3.0 * torch.randn(groups, summary_dim, generator=g)
    group = torch.randint(groups, (patients,), generator=g)
    summary = centres[group] + 0.5 * torch.randn(patients, summary_dim, generator=g)
    rows, labels, who = [], [], []
    for p in range(patients):
        x = torch.randn(samples, features, generator=g)
        logits = x @ (w0 + u[group[p]] + v).T  # (samples, diseases)
        y = torch.bernoulli(torch.sigmoid(logits), generator=g)
        rates = torch.full((diseases,), assessed)
        if scarce is not None:
            rates[-1] = scarce
        y[:, torch.rand(diseases, generator=g) >= rates] = float("nan")
        rows.append(torch.cat([summary[p].expand(samples, -1), x], dim=1))
        labels.append(y)
        who.append(torch.full((samples,), p))
    inputs, y_all, patient = torch.cat(rows), torch.cat(labels), torch.cat(who)
    names = [f"disease{d}" for d in range(diseases)]
    data = MultiTaskTensorDataset(inputs, {n: y_all[:, d] for d, n in enumerate(names)})
    order = torch.randperm(patients, generator=g)
    n_test = max(1, int(test_share * patients))
    tasks = TaskSet([Task(n, "bce", metrics=["accuracy"]) for n in names])
    return Cohort(
        data,
        tasks,
        patient,
        group[patient],
        order[n_test:].sort().values,
        order[:n_test].sort().values,
        summary_dim,
    )
