"""Data selection against negative transfer with MTIF scores: drop the training points (one task's
label on one sample) whose influence on the target tasks' validation loss is harmful, then
retrain from the same initialisation.

The rule (the paper's exact rule and fractions are not public; this is the spec's stated one):
score each candidate point by its summed helpfulness for the target tasks; drop those with a
negative score (``drop="negative"``) or the lowest fraction ``q`` of the candidates
(``drop=q``); candidates come from the auxiliary tasks only (``sources="auxiliary"``, the
default) or from every task. Dropping masks the label, so the sample still trains the other tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlkit.data.base import MultiTaskTensorDataset
from mtlkit.errors import ConfigError
from mtlkit.relatedness.mtif import InfluenceScores

SOURCES = ("auxiliary", "all")


def select_points(
    scores: InfluenceScores,
    targets: Sequence[str],
    drop: str | float = "negative",
    sources: str = "auxiliary",
    normalized: bool = True,
) -> dict[str, Tensor]:
    """``{task: keep mask (N,) bool}``: False for the points to drop (see the module docstring)."""
    if sources not in SOURCES:
        raise ConfigError(f"sources must be one of {SOURCES}, got {sources!r}.")
    if isinstance(drop, str):
        if drop != "negative":
            raise ConfigError(f"drop must be 'negative' or a fraction in (0, 1), got {drop!r}.")
    elif not (isinstance(drop, float) and 0 < drop < 1):
        raise ConfigError(f"drop must be 'negative' or a fraction in (0, 1), got {drop!r}.")
    s = scores.point_scores(targets, normalized)  # (N, K), NaN where there is no point
    candidate = torch.isfinite(s)
    if sources == "auxiliary":
        for t in targets:
            candidate[:, scores.tasks.index(t)] = False
    if not bool(candidate.any()):
        raise ConfigError(
            "No candidate points: with sources='auxiliary', name fewer target tasks than tasks."
        )
    dropped = torch.zeros_like(candidate)
    if drop == "negative":
        dropped = candidate & (s < 0)
    else:
        assert isinstance(drop, float)
        index = candidate.nonzero()  # (n, 2): sample, task
        count = int(drop * index.shape[0])
        lowest = torch.argsort(s[candidate], stable=True)[:count]  # exactly count points, ties by position
        dropped[index[lowest, 0], index[lowest, 1]] = True
    return {name: ~dropped[:, j] for j, name in enumerate(scores.tasks)}


def random_selection(keep: Mapping[str, Tensor], scores: InfluenceScores, seed: int = 0) -> dict[str, Tensor]:
    """The control: as many points dropped per task as ``keep`` drops, chosen at random among the
    task's labelled points."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, name in enumerate(scores.tasks):
        mask = keep.get(name)
        if mask is None:
            continue
        labelled = (scores.counts[:, j] > 0).nonzero().squeeze(1)
        n_drop = int((~mask.to(torch.bool) & (scores.counts[:, j] > 0)).sum())
        chosen = labelled[torch.randperm(labelled.numel(), generator=g)[:n_drop]]
        new = torch.ones(scores.counts.shape[0], dtype=torch.bool)
        new[chosen] = False
        out[name] = new
    return out


def drop_points(dataset: MultiTaskTensorDataset, keep: Mapping[str, Tensor]) -> MultiTaskTensorDataset:
    """The dataset with each task's dropped labels masked (existing masks are kept)."""
    n = len(dataset)
    masks = dict(dataset.masks or {})
    for name, mask in keep.items():
        mask = mask.to(torch.bool)
        if mask.shape != (n,):
            raise ConfigError(f"keep[{name!r}] must have shape ({n},), got {tuple(mask.shape)}.")
        old = masks.get(name)
        if old is not None and old.shape != (n,):
            raise ConfigError(
                f"The dataset's mask for {name!r} is per entry; drop_points masks whole samples."
            )
        masks[name] = mask if old is None else old.to(torch.bool) & mask
    return MultiTaskTensorDataset(dataset.inputs, dataset.targets, masks)
