"""The configuration of ``mtlkit affinity CONFIG.yaml``: a run configuration (``mtlkit train``'s
keys) plus an ``affinity:`` section, every key and range checked before any data is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlkit.core.yaml_files import read_yaml_mapping
from mtlkit.errors import ConfigError, UnknownNameError
from mtlkit.relatedness.ihvp import check_solver, finite_damping
from mtlkit.relatedness.objective import CURVATURES, PARAMETER_CHOICES
from mtlkit.relatedness.tag import OFFICIAL_SINGLETON_SCORE
from mtlkit.train.config import RunConfig, check_components, check_values, from_dict

MEASURES = ("tag", "cosine", "mtif", "cross_loss")
GROUPING_MEASURES = ("tag", "cosine", "mtif")


@dataclass
class MtifSettings:
    """:func:`~mtlkit.relatedness.mtif.influence_scores`'s settings; ``options`` are the solver's own
    (``max_iterations`` for ``cg`` ...)."""

    solver: str = "ekfac"
    parameters: str = "last"
    damping: float | None = None
    curvature: str = "hessian"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AffinitySettings:
    """``every``: steps between TAG lookaheads and gradient measurements; ``probe_size``: validation
    rows of the fixed batch for gradient cosines; ``budget``: the number of task groups; ``singleton_score``: a task alone scores this in the group
    selection (the official -1e6 never trains a task alone; 0 does when every group would bring it
    negative affinity);
    ``group_by``: the measures whose groupings are reported (and trained); ``mtif``: the influence
    settings (null: no MTIF); ``train_groups``: train every suggested grouping, all-in-one and
    single-task, for each of ``seeds``; ``train_size``: a seeded subset (seed 0) of the training split."""

    every: int = 10
    probe_size: int = 512
    budget: int = 2
    singleton_score: float = OFFICIAL_SINGLETON_SCORE
    group_by: list[str] = field(default_factory=lambda: list(GROUPING_MEASURES))
    mtif: MtifSettings | None = field(default_factory=MtifSettings)
    train_groups: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    train_size: int | None = None


@dataclass
class AffinityJob:
    run: RunConfig
    affinity: AffinitySettings


def check_settings(a: AffinitySettings) -> None:
    for key, value in (("every", a.every), ("probe_size", a.probe_size), ("budget", a.budget)):
        if value < 1:
            raise ConfigError(f"affinity.{key} must be >= 1; got {value!r}.")
    if not math.isfinite(a.singleton_score):
        raise ConfigError(f"affinity.singleton_score must be a finite number; got {a.singleton_score!r}.")
    if a.train_size is not None and a.train_size < 1:
        raise ConfigError(f"affinity.train_size must be >= 1 or null; got {a.train_size!r}.")
    bad = [m for m in a.group_by if m not in GROUPING_MEASURES]
    if bad or not a.group_by:
        raise ConfigError(f"affinity.group_by names measures among {GROUPING_MEASURES}; got {a.group_by!r}.")
    if "mtif" in a.group_by and a.mtif is None:
        raise ConfigError("affinity.group_by names mtif, but affinity.mtif is null.")
    if not a.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in a.seeds):
        raise ConfigError(f"affinity.seeds must be a non-empty list of integers; got {a.seeds!r}.")
    if len(set(a.seeds)) != len(a.seeds):
        raise ConfigError(f"affinity.seeds must not repeat a seed (it would count twice); got {a.seeds!r}.")
    if a.mtif is not None:
        try:
            check_solver(a.mtif.solver, a.mtif.options)
            finite_damping(a.mtif.damping)
        except (ConfigError, UnknownNameError) as exc:
            raise ConfigError(f"affinity.mtif: {exc}") from exc
        if a.mtif.curvature not in CURVATURES:
            raise ConfigError(
                f"affinity.mtif.curvature must be one of {CURVATURES}; got {a.mtif.curvature!r}."
            )
        if a.mtif.parameters not in PARAMETER_CHOICES:
            raise ConfigError(
                f"affinity.mtif.parameters must be one of {PARAMETER_CHOICES}; got {a.mtif.parameters!r}."
            )


def load_affinity_config(path: str | Path) -> AffinityJob:
    raw = read_yaml_mapping(Path(path))
    settings = from_dict(AffinitySettings, raw.pop("affinity", None), "affinity")
    run = from_dict(RunConfig, raw)
    check_values(run)
    check_settings(settings)
    check_components(run)
    return AffinityJob(run, settings)
