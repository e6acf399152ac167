"""The benchmark suite's YAML file, validated into typed dataclasses before anything runs.

A suite is methods x architectures x datasets x seeds::

    name: quick
    output: runs/bench/quick
    seeds: [0, 1]
    workers: 2
    methods: [all]                    # every registered method; or names / {name, options, label}
    datasets:
      - name: qm9                     # (a dataset may name its own `methods:` instead)
        train_size: 40000             # a seeded subset of the training split (null: all of it)
        epochs: 3
        batch_size: 256
        optimizer: {name: adam, lr: 0.001}
        architectures:
          - {name: shared_bottom, options: {bottom_dims: [256, 128], tower_dims: [64]}}

Every key is checked (unknown keys with close matches, types, ranges); dataset, model and method
names and options are checked against the registries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtlkit.core.yaml_files import read_yaml_mapping
from mtlkit.errors import ConfigError
from mtlkit.train.config import (
    OptimizerConfig,
    RunConfig,
    check_components,
    check_values,
    from_dict,
)

SELECTIONS = ("last", "best_val")


@dataclass
class ComponentSpec:
    """A registered model or method with options, and the label reports use for it."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass
class DatasetSpec:
    """One dataset of the suite and its training protocol (shared by every method on it)."""

    name: str
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train_size: int | None = None
    epochs: int = 1
    batch_size: int = 256
    eval_batch_size: int = 8192
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_clip: float | None = None
    selection: str = "last"
    architectures: list[Any] = field(default_factory=list)
    #: the methods run on this dataset instead of the suite's (e.g. FULLER on a modality model)
    methods: list[Any] | None = None

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass
class SuiteConfig:
    """A whole suite: ``mtlkit bench SUITE.yaml``."""

    name: str = "suite"
    output: str = "runs/bench"
    seeds: list[Any] = field(default_factory=lambda: [0])
    workers: int = 1
    threads: int = 1
    device: str = "cpu"
    log_every: int = 10
    methods: list[Any] = field(default_factory=lambda: ["all"])
    datasets: list[Any] = field(default_factory=list)


def _component(value: Any, key: str) -> ComponentSpec:
    if isinstance(value, str):
        return ComponentSpec(value)
    spec: ComponentSpec = from_dict(ComponentSpec, value, key)
    return spec


def expand_methods(entries: list[Any]) -> list[ComponentSpec]:
    """Method entries with ``all`` expanded to every registered method (in registry order) that
    runs on any architecture (FULLER, which needs modality branches, must be named)."""
    from mtlkit.methods import available, method_class

    out: list[ComponentSpec] = []
    for i, entry in enumerate(entries):
        if entry == "all":  # methods that need a particular model (FULLER) are named explicitly
            out += [
                ComponentSpec(name)
                for name in available()
                if not getattr(method_class(name), "model_requirement", None)
            ]
        else:
            out.append(_component(entry, f"methods[{i}]"))
    return out


def load_suite(path: str | Path) -> SuiteConfig:
    """Read and validate a suite file (see the module docstring)."""
    return parse_suite(read_yaml_mapping(Path(path)))


def parse_suite(raw: dict[str, Any]) -> SuiteConfig:
    """Validate a suite given as a mapping; datasets, architectures and methods become specs."""
    suite: SuiteConfig = from_dict(SuiteConfig, raw)
    if not suite.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in suite.seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers, got {suite.seeds!r}.")
    if len(set(suite.seeds)) != len(suite.seeds):
        raise ConfigError(f"seeds: {suite.seeds} repeats a seed.")
    for key in ("workers", "threads", "log_every"):
        if getattr(suite, key) < 1:
            raise ConfigError(f"{key} must be >= 1; got {getattr(suite, key)!r}.")
    if not suite.datasets:
        raise ConfigError("datasets: a suite needs at least one dataset.")
    suite.methods = expand_methods(suite.methods)
    if not suite.methods:
        raise ConfigError("methods: a suite needs at least one method.")
    suite.datasets = [from_dict(DatasetSpec, d, f"datasets[{i}]") for i, d in enumerate(suite.datasets)]
    for i, d in enumerate(suite.datasets):
        key = f"datasets[{i}]"
        if d.selection not in SELECTIONS:
            raise ConfigError(f"{key}.selection must be one of {', '.join(SELECTIONS)}; got {d.selection!r}.")
        if d.train_size is not None and d.train_size < 1:
            raise ConfigError(f"{key}.train_size must be >= 1 or null; got {d.train_size!r}.")
        if d.epochs < 1:
            raise ConfigError(f"{key}.epochs must be >= 1; got {d.epochs!r}.")
        if not d.architectures:
            raise ConfigError(f"{key}.architectures: name at least one model.")
        d.architectures = [_component(a, f"{key}.architectures[{j}]") for j, a in enumerate(d.architectures)]
        _unique([a.title for a in d.architectures], f"{key}.architectures")
        if d.methods is not None:
            d.methods = expand_methods(d.methods)
            if not d.methods:
                raise ConfigError(
                    f"{key}.methods: name at least one method (or leave it out for the suite's)."
                )
            _unique([m.title for m in d.methods], f"{key}.methods")
    _unique([d.title for d in suite.datasets], "datasets")
    _unique([m.title for m in suite.methods], "methods")
    for d in suite.datasets:  # every component and option, before any data is loaded
        for a in d.architectures:
            for m in methods_for(suite, d):
                cfg = run_config(d, a, m, suite.seeds[0], Path("."), suite.device, suite.log_every)
                check_values(cfg)
                check_components(cfg)
    return suite


def methods_for(suite: SuiteConfig, dataset: DatasetSpec) -> list[ComponentSpec]:
    """The methods run on ``dataset``: its own list when it has one, else the suite's."""
    return dataset.methods if dataset.methods is not None else suite.methods


def _unique(labels: list[str], key: str) -> None:
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ConfigError(f"{key}: {repeated} appear twice; give them distinct labels.")


def run_config(
    dataset: DatasetSpec,
    architecture: ComponentSpec,
    method: ComponentSpec,
    seed: int,
    output: Path,
    device: str,
    log_every: int,
) -> RunConfig:
    """The :class:`~mtlkit.train.config.RunConfig` of one run of the suite."""
    from mtlkit.train.config import (
        DataConfig,
        EarlyStoppingConfig,
        MethodConfig,
        ModelConfig,
        TrainerConfig,
    )

    early = None
    if dataset.selection == "best_val":  # keep the best validation epoch, never stop early
        early = EarlyStoppingConfig(monitor="delta_m", patience=dataset.epochs + 1)
    return RunConfig(
        data=DataConfig(dataset.name, dataset.batch_size, dataset.eval_batch_size, dict(dataset.options)),
        model=ModelConfig(architecture.name, dict(architecture.options)),
        method=MethodConfig(method.name, dict(method.options)),
        optimizer=OptimizerConfig(**asdict(dataset.optimizer)),
        trainer=TrainerConfig(
            epochs=dataset.epochs,
            device=device,
            grad_clip=dataset.grad_clip,
            log_every=log_every,
            tensorboard=False,
            progress=False,
            early_stopping=early,
        ),
        seed=seed,
        output=str(output),
    )


def fingerprint(payload: Any) -> str:
    """A short stable hash of a JSON-able description (what makes a stored result reusable)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
