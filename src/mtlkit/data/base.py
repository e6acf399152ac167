"""In-memory multi-task datasets that batch by tensor indexing, served through a real DataLoader."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mtlkit.core.registry import Registry
from mtlkit.core.tasks import Batch, TaskSet
from mtlkit.errors import ShapeMismatchError

DATASETS: Registry[Any] = Registry("dataset")


def cache_dir() -> Path:
    """``$MTLKIT_CACHE``, else ``$XDG_CACHE_HOME/mtlkit``, else ``~/.cache/mtlkit``."""
    if os.environ.get("MTLKIT_CACHE"):
        return Path(os.environ["MTLKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mtlkit"


class MultiTaskTensorDataset(Dataset):
    """Inputs (N, ...) and ``{task: targets (N, ...)}`` held as tensors.

    ``dataset[i]`` gives ``(x_i, {task: y_i})``; a DataLoader fetches whole batches at once through
    ``__getitems__`` (one indexing operation per tensor instead of N Python calls), which
    :func:`loader` wires up.
    """

    def __init__(
        self, inputs: Tensor, targets: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None
    ) -> None:
        n = inputs.shape[0]
        for name, t in {**targets, **(masks or {})}.items():
            if t.shape[0] != n:
                raise ShapeMismatchError(f"Target/mask {name!r} has {t.shape[0]} rows, inputs have {n}.")
        self.inputs = inputs
        self.targets = dict(targets)
        self.masks = dict(masks) if masks else None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.inputs[index], {k: v[index] for k, v in self.targets.items()}

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        masks = {k: v[idx] for k, v in self.masks.items()} if self.masks else None
        return Batch(self.inputs[idx], {k: v[idx] for k, v in self.targets.items()}, masks)

    def subset(self, indices: Tensor) -> MultiTaskTensorDataset:
        masks = {k: v[indices] for k, v in self.masks.items()} if self.masks else None
        return MultiTaskTensorDataset(
            self.inputs[indices], {k: v[indices] for k, v in self.targets.items()}, masks
        )


def _keep_batch(batch: Any) -> Any:
    return batch


def loader(
    dataset: MultiTaskTensorDataset,
    batch_size: int = 256,
    shuffle: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A ``torch.utils.data.DataLoader`` yielding :class:`~mtlkit.core.tasks.Batch` objects."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=_keep_batch,
        generator=generator,
    )


@dataclass
class FeatureSplits:
    """A processed dataset of feature vectors: three splits, the task set and the feature names."""

    train: MultiTaskTensorDataset
    val: MultiTaskTensorDataset
    test: MultiTaskTensorDataset
    tasks: TaskSet
    feature_names: list[str]

    @property
    def in_features(self) -> int:
        return len(self.feature_names)


def seeded_subset(dataset: Any, size: int | None, seed: int) -> Any:
    """``dataset`` (a split container with ``train``) with its training split cut to a seeded random
    subset of ``size`` rows in their original order; unchanged when ``size`` is None or too big."""
    n = len(dataset.train)
    if size is None or size >= n:
        return dataset
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return dataclasses.replace(dataset, train=dataset.train.subset(keep.sort().values))
