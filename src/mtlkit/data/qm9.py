"""QM9 (Ramakrishnan et al., Scientific Data 2014) with the 11 targets of the Nash-MTL / FAMO protocol,
read from the CSV files of the ``qm9pack`` wheel and featurised with RDKit so that it trains on a CPU.

**Targets** (the PyTorch Geometric target indices ``[0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]`` used by
Navon et al., ICML 2022 and Liu et al., NeurIPS 2023, in that order): ``mu`` (D), ``alpha`` (bohr^3),
``homo``, ``lumo``, ``zpve`` (eV), ``r2`` (bohr^2), ``U0``, ``U``, ``H``, ``G`` (atomisation energies,
eV) and ``Cv`` (cal/mol/K). qm9pack gives *total* energies in Hartree; the published protocol trains on
*atomisation* energies, so the loader subtracts the per-element reference energies of the QM9 paper's
``atomref`` table (B3LYP/6-31G(2df,p) energies of the free H, C, N, O and F atoms at 0 K and 298.15 K),
times the molecule's element counts, and converts Hartree to eV (``energies="total"`` keeps the total
energies in eV instead; their spread is dominated by the element counts, so the tasks change).

**Metrics.** Each task's metric is its mean absolute error in the units of the published tables:
meV for ``homo``, ``lumo``, ``zpve``, ``U0``, ``U``, ``H`` and ``G`` (the official code multiplies the eV
errors by 1,000), the native units above for the rest.

**Normalisation.** As in the official code's default (``--scale-y True``), targets are standardised
with a mean and deviation per target, the model trains on the standardised values with MSE, and the
MAE is reported back in physical units (``normalize=False`` is the flag turned off: the targets keep
their physical scales, which differ by about six orders of magnitude, and the loss sums are dominated
by ``r2``; this is what moves the published Δm% of the same method by a factor of about two). We take the
statistics from the training split only; the official code takes them over all 130,831 molecules
(``train_dataset.data`` is the whole dataset's storage), a small leak of the test targets we do not copy.

**Features** (a departure from the protocol, which trains a message-passing network on the 3-D graph):
a 1,024-bin Morgan count fingerprint (radius 2) of the SMILES, plus 24 standardised descriptors: element
counts, atom and heavy-atom counts, RDKit's logP, molar refractivity, TPSA, rotatable bonds, rings,
aromatic rings, fraction of sp3 carbons, H-bond donors and acceptors, and six from the DFT geometry of
the file (mean squared and largest distance from the centre of mass, the three principal moments of
inertia, the largest interatomic distance). Numbers from this set are comparable with each other, not
with the GNN tables.

**Splits** as in the official code: a seeded permutation of the 130,831 molecules, 10,000 for test,
the next 10,000 for validation, the remaining 110,831 for training.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlkit.core.metric import Metric
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import DATASETS, FeatureSplits, MultiTaskTensorDataset, cache_dir
from mtlkit.data.donors import Donor, DonorFile, load_cache, package_root, save_cache
from mtlkit.errors import ConfigError, DatasetNotAvailableError

INSTALL = "pip install --no-deps qm9pack==1.0.3"
PROCESSING_VERSION = 1
MOLECULES = 130_831
TEST_SIZE = VAL_SIZE = 10_000
HARTREE_EV = 27.211386246  # CODATA 2018, the factor PyTorch Geometric uses
FINGERPRINT_BITS = 1024

#: the donor's files: path below the package, size in bytes, SHA-256 (qm9pack 1.0.3)
DONOR = Donor(
    "qm9pack",
    INSTALL,
    package_root("qm9pack", INSTALL, "data"),
    {
        f"part{i}": DonorFile(f"qm9_part{i}.csv", size, sha)
        for i, size, sha in (
            (1, 69_693_764, "19f0a5d595462d52cd82eef3370f3e9eb55a1f52cb14985657200349568deff3"),
            (2, 76_868_612, "2bca113fdc0b28a13563c80ed9b240e934f3da6c64c64fe74ddb4f0f36036e61"),
            (3, 79_083_002, "9c5efb5733d2af149db8d95d36ff198b4ffed12d9f7b344220a1e5877d5c6a43"),
        )
    },
)

ELEMENTS = ("H", "C", "N", "O", "F")  # the order of qm9pack's Stoichiometry column
MASSES = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "F": 18.998}
#: free-atom reference energies (Hartree) of the QM9 paper's atomref table, per energy target
ATOM_REFERENCE = {
    "U0": (-0.500273, -37.846772, -54.583861, -75.064579, -99.718730),
    "U": (-0.498857, -37.845355, -54.582445, -75.063163, -99.717314),
    "H": (-0.497912, -37.844411, -54.581501, -75.062219, -99.716370),
    "G": (-0.510927, -37.861317, -54.598897, -75.079532, -99.733544),
}
#: task -> (qm9pack column, factor to the training unit, factor from the training unit to the
#: reported unit, reported unit)
TARGETS: dict[str, tuple[str, float, float, str]] = {
    "mu": ("Dipole_debye", 1.0, 1.0, "D"),
    "alpha": ("Polarizability_bohr3", 1.0, 1.0, "bohr^3"),
    "homo": ("HOMO_au", HARTREE_EV, 1000.0, "meV"),
    "lumo": ("LUMO_au", HARTREE_EV, 1000.0, "meV"),
    "r2": ("R2_bohr2", 1.0, 1.0, "bohr^2"),
    "zpve": ("ZPVE_au", HARTREE_EV, 1000.0, "meV"),
    "U0": ("InternalEnergy_0K_au", HARTREE_EV, 1000.0, "meV"),
    "U": ("InternalEnergy_298K_au", HARTREE_EV, 1000.0, "meV"),
    "H": ("Enthalphy_298K_au", HARTREE_EV, 1000.0, "meV"),
    "G": ("GibbsFreeEnergy_298K_au", HARTREE_EV, 1000.0, "meV"),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", 1.0, 1.0, "cal/mol/K"),
}
TASK_NAMES = tuple(TARGETS)
DESCRIPTOR_NAMES = (
    *(f"count_{e}" for e in ELEMENTS),
    "atoms", "heavy_atoms", "logp", "molar_refractivity", "tpsa", "rotatable_bonds", "rings",
    "aromatic_rings", "fraction_csp3", "hbd", "hba", "mass", "mean_sq_radius", "max_radius",
    "inertia_1", "inertia_2", "inertia_3", "max_distance", "bonds",
)  # fmt: skip


def _scaled_mae(scale: float, y: np.ndarray, s: np.ndarray) -> float:
    return float(np.abs(np.asarray(y, np.float64) - np.asarray(s, np.float64)).mean() * scale)


def qm9_tasks(scales: dict[str, float] | None = None) -> TaskSet:
    """The 11 regression tasks (MSE loss); each metric is the MAE in the reported unit.

    ``scales[task]`` converts the training unit (a standardised target, or the physical value) to
    the reported unit.
    """
    scales = scales or {t: TARGETS[t][2] for t in TASK_NAMES}
    return TaskSet(
        [
            Task(t, loss="mse", metrics=[Metric("mae", functools.partial(_scaled_mae, scales[t]), False)])
            for t in TASK_NAMES
        ]
    )


@dataclass
class QM9(FeatureSplits):
    """The processed dataset: three splits, the task set, feature names and target statistics.

    ``units[task]`` is the unit its MAE is reported in; ``target_mean``/``target_std`` are the
    standardisation statistics (0 and 1 with ``normalize=False``) in the training unit (eV for energies).
    """

    units: dict[str, str]
    target_mean: dict[str, float]
    target_std: dict[str, float]


def _floats(text: str) -> np.ndarray:
    # qm9pack writes coordinates as nested lists with numbers such as "0." and "2.1997E-6", which
    # JSON does not accept; float() does
    return np.array([float(v) for v in text.replace("[", "").replace("]", "").split(",")]).reshape(-1, 3)


def _element_counts(stoichiometry: str) -> np.ndarray:
    """H, C, N, O, F counts from qm9pack's Stoichiometry column ("[4,1,0,0,0]" for methane)."""
    return np.array([int(c) for c in stoichiometry.strip("[]").split(",")], dtype=np.float64)


def _geometry(xyz: np.ndarray, masses: np.ndarray) -> list[float]:
    centre = (masses[:, None] * xyz).sum(0) / masses.sum()
    rel = xyz - centre
    sq = (rel**2).sum(1)
    inertia = np.sort(np.linalg.eigvalsh((masses * sq).sum() * np.eye(3) - (masses[:, None] * rel).T @ rel))
    dist = np.sqrt(((xyz[:, None, :] - xyz[None, :, :]) ** 2).sum(-1)).max()
    return [float(sq.mean()), float(np.sqrt(sq.max())), *map(float, inertia), float(dist)]


def _featurise(frame: Any) -> tuple[np.ndarray, np.ndarray]:
    # imported by name: RDKit is optional (the `data` extra) and its stubs are incomplete
    Chem: Any = importlib.import_module("rdkit.Chem")
    Descriptors: Any = importlib.import_module("rdkit.Chem.Descriptors")
    rdFingerprintGenerator: Any = importlib.import_module("rdkit.Chem.rdFingerprintGenerator")
    rdMolDescriptors: Any = importlib.import_module("rdkit.Chem.rdMolDescriptors")
    importlib.import_module("rdkit.RDLogger").DisableLog("rdApp.*")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=FINGERPRINT_BITS)
    n = len(frame)
    fingerprints = np.zeros((n, FINGERPRINT_BITS), dtype=np.float32)
    descriptors = np.zeros((n, len(DESCRIPTOR_NAMES)), dtype=np.float64)
    mass_of = np.array([MASSES[e] for e in ELEMENTS])
    for i, (smiles, stoichiometry, elements, xyz) in enumerate(
        zip(frame["SMILES"], frame["Stoichiometry"], frame["Elements"], frame["XYZ_Ang"], strict=True)
    ):
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raise DatasetNotAvailableError(f"RDKit cannot parse the QM9 SMILES {smiles!r} (row {i}).")
        fingerprints[i] = generator.GetCountFingerprintAsNumPy(mol)
        counts = _element_counts(stoichiometry)
        symbols = [s.strip(" '\"") for s in elements.strip("[]").split(",")]
        masses = np.array([MASSES[s] for s in symbols])
        descriptors[i] = [
            *counts,
            counts.sum(),
            counts[1:].sum(),
            Descriptors.MolLogP(mol),
            Descriptors.MolMR(mol),
            rdMolDescriptors.CalcTPSA(mol),
            rdMolDescriptors.CalcNumRotatableBonds(mol),
            rdMolDescriptors.CalcNumRings(mol),
            rdMolDescriptors.CalcNumAromaticRings(mol),
            rdMolDescriptors.CalcFractionCSP3(mol),
            rdMolDescriptors.CalcNumHBD(mol),
            rdMolDescriptors.CalcNumHBA(mol),
            float(counts @ mass_of),
            *_geometry(_floats(xyz), masses),
            mol.GetNumBonds(),
        ]
    return fingerprints, descriptors


def _targets(frame: Any, energies: str) -> np.ndarray:
    counts = np.stack([_element_counts(text) for text in frame["Stoichiometry"]])
    columns = []
    for task in TASK_NAMES:
        column, to_unit, _, _ = TARGETS[task]
        values = frame[column].to_numpy(np.float64)
        if energies == "atomization" and task in ATOM_REFERENCE:
            values = values - counts @ np.array(ATOM_REFERENCE[task])
        columns.append(values * to_unit)
    return np.stack(columns, axis=1)


def _read(paths: dict[str, Path]) -> Any:
    import pandas as pd

    columns = ["SMILES", "Stoichiometry", "Elements", "XYZ_Ang", *(TARGETS[t][0] for t in TASK_NAMES)]
    frame = pd.concat([pd.read_csv(paths[k], usecols=columns) for k in sorted(paths)], ignore_index=True)
    if len(frame) != MOLECULES:
        raise DatasetNotAvailableError(f"qm9pack's files hold {len(frame)} molecules, expected {MOLECULES}.")
    return frame


def _build(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Features and both target variants for all molecules, in file order (no split, no scaling)."""
    frame = _read(paths)
    fingerprints, descriptors = _featurise(frame)
    return {
        "fingerprints": torch.from_numpy(fingerprints),
        "descriptors": torch.from_numpy(descriptors),
        "targets/atomization": torch.from_numpy(_targets(frame, "atomization")),
        "targets/total": torch.from_numpy(_targets(frame, "total")),
    }


def _cached_arrays(cache: Path | str | None, refresh: bool) -> dict[str, torch.Tensor]:
    paths = DONOR.paths()
    root = Path(cache) if cache is not None else cache_dir()
    stem = root / "qm9" / f"v{PROCESSING_VERSION}"
    cached = None if refresh else load_cache(stem)
    if cached is not None:
        DONOR.verify(paths, checksum=False)  # sizes only: the cache was built from checked files
        return cached[0]
    DONOR.verify(paths)
    tensors = _build(paths)
    save_cache(stem, tensors, {"sources": {k: f.sha256 for k, f in DONOR.files.items()}})
    return tensors


@DATASETS.register("qm9")
def load_qm9(
    seed: int = 0,
    energies: str = "atomization",
    normalize: bool = True,
    cache: Path | str | None = None,
    refresh: bool = False,
) -> QM9:
    """Load QM9 with the 11 targets of the Nash-MTL protocol (see the module docstring).

    Args:
        seed: seed of the test / validation / training permutation.
        energies: ``"atomization"`` (the published protocol) or ``"total"`` for U0, U, H and G.
        normalize: standardise the targets with the training split's statistics (the protocol's
            default); ``False`` trains on the physical values.
        cache: cache directory (default :func:`~mtlkit.data.base.cache_dir`); features are computed
            once (about a minute) and cached.
        refresh: rebuild the cache even if it exists.
    """
    if energies not in ("atomization", "total"):
        raise ConfigError(f"qm9: energies must be 'atomization' or 'total', got {energies!r}.")
    if not isinstance(normalize, bool):
        raise ConfigError(f"qm9: normalize must be true or false, got {normalize!r}.")
    arrays = _cached_arrays(cache, refresh)
    perm = torch.randperm(MOLECULES, generator=torch.Generator().manual_seed(seed))
    index = {
        "test": perm[:TEST_SIZE],
        "val": perm[TEST_SIZE : TEST_SIZE + VAL_SIZE],
        "train": perm[TEST_SIZE + VAL_SIZE :],
    }
    descriptors = arrays["descriptors"]
    d_mean = descriptors[index["train"]].mean(0)
    d_std = descriptors[index["train"]].std(0).clamp_min(1e-12)
    features = torch.cat([arrays["fingerprints"], ((descriptors - d_mean) / d_std).float()], dim=1)
    targets = arrays[f"targets/{energies}"]
    if normalize:
        mean, std = targets[index["train"]].mean(0), targets[index["train"]].std(0)
    else:
        mean, std = (
            torch.zeros(len(TASK_NAMES), dtype=targets.dtype),
            torch.ones(len(TASK_NAMES), dtype=targets.dtype),
        )
    scaled = ((targets - mean) / std).float()

    def split(name: str) -> MultiTaskTensorDataset:
        idx = index[name]
        return MultiTaskTensorDataset(features[idx], {t: scaled[idx, j] for j, t in enumerate(TASK_NAMES)})

    reported = {t: float(std[j]) * TARGETS[t][2] for j, t in enumerate(TASK_NAMES)}
    names = [f"morgan_{i}" for i in range(FINGERPRINT_BITS)] + list(DESCRIPTOR_NAMES)
    return QM9(
        split("train"),
        split("val"),
        split("test"),
        qm9_tasks(reported),
        names,
        {t: TARGETS[t][3] for t in TASK_NAMES},
        {t: float(mean[j]) for j, t in enumerate(TASK_NAMES)},
        {t: float(std[j]) for j, t in enumerate(TASK_NAMES)},
    )
