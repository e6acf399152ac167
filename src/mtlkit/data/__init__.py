"""Real datasets, synthetic generators and multi-task batching."""

from typing import Any

from mtlkit.data.base import DATASETS, MultiTaskTensorDataset, cache_dir, loader, seeded_subset
from mtlkit.data.census import CensusIncome, load_census_income
from mtlkit.data.cohort import Cohort, adh_cohort
from mtlkit.data.diffusion import DiffusionLoader, NoiseSchedule, interval_tasks
from mtlkit.data.exam import Exam, load_ilea_exam
from mtlkit.data.images import load_digits_8x8, load_fashion_mnist, load_mnist_10k
from mtlkit.data.label_masks import with_label_masks
from mtlkit.data.multi_images import (
    TwoItemImages,
    load_multi_fashion,
    load_multi_fashion_mnist,
    load_multi_mnist_10k,
)
from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.data.planted_factors import clustered_coefficients, planted_factor_tasks
from mtlkit.data.qm9 import QM9, load_qm9
from mtlkit.data.routing_synthetic import RoutingSynthetic, routing_synthetic
from mtlkit.data.synthetic import load_mmoe_synthetic, load_modality_bias, mmoe_synthetic


def load(name: str, **kwargs: Any) -> Any:
    """Load the dataset registered under ``name`` (see :func:`available`)."""
    return DATASETS.create(name, **kwargs)


def available() -> list[str]:
    return DATASETS.available()


__all__ = [
    "DATASETS",
    "QM9",
    "CensusIncome",
    "Cohort",
    "DiffusionLoader",
    "Exam",
    "MultiInputLoader",
    "MultiTaskTensorDataset",
    "NoiseSchedule",
    "RoutingSynthetic",
    "TwoItemImages",
    "adh_cohort",
    "available",
    "cache_dir",
    "clustered_coefficients",
    "interval_tasks",
    "load",
    "load_census_income",
    "load_digits_8x8",
    "load_fashion_mnist",
    "load_ilea_exam",
    "load_mmoe_synthetic",
    "load_mnist_10k",
    "load_modality_bias",
    "load_multi_fashion",
    "load_multi_fashion_mnist",
    "load_multi_mnist_10k",
    "load_qm9",
    "loader",
    "mmoe_synthetic",
    "planted_factor_tasks",
    "routing_synthetic",
    "seeded_subset",
    "with_label_masks",
]
