"""YAML run configurations validated into typed dataclasses.

Every key is checked: an unknown key, a wrong type or a bad value raises
:class:`~mtlkit.errors.ConfigError` naming the key (with close matches for typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlkit.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "census_income"
    batch_size: int = 1024
    eval_batch_size: int = 8192
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "mmoe"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "ew"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0


@dataclass
class EarlyStoppingConfig:
    monitor: str = "delta_m"
    patience: int = 5
    min_delta: float = 0.0
    mode: str = "auto"


@dataclass
class TrainerConfig:
    epochs: int = 1
    device: str = "auto"
    grad_clip: float | None = None
    amp: bool | str = False
    log_every: int = 50
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    early_stopping: EarlyStoppingConfig | None = None


@dataclass
class RunConfig:
    """A whole run: ``mtlkit train CONFIG.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    output: str = "runs/run"
    reference: str | None = None  # JSON report of single-task baselines, for Δm%

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Scalar config types: which YAML values they accept (bool is not an int here) and how to say so.
_SCALARS: dict[type, tuple[Any, str]] = {
    bool: (lambda v: isinstance(v, bool), "true/false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _check(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(typing.get_args(tp)):
            return None
        if len(arms) == 1:  # Optional[X]: X's own error is the most useful one
            return _check(value, arms[0], key)
        for arm in arms:
            try:
                return _check(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}.")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    container = {dict: dict, list: list}.get(origin)  # type: ignore[call-overload]
    if container is not None:
        if not isinstance(value, container):
            raise ConfigError(
                f"{key}: expected a {'mapping' if container is dict else 'list'}, got {type(value).__name__}."
            )
        return container(value)
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(f"{key}: expected {expected}, got {value!r}.")
        return float(value) if tp is float else value
    raise ConfigError(f"{key}: unsupported type {tp!r}.")


def _type_name(tp: Any) -> str:
    return " or ".join(
        "null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(tp)
    )


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"Unknown config key {full!r}.{hint} Allowed here: {', '.join(names)}.")
        kwargs[key] = _check(value, hints[key], full)
    return cls(**kwargs)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML run configuration."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {path} does not exist.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    config = from_dict(RunConfig, raw or {})
    for dotted, value in (overrides or {}).items():
        target: Any = config
        *parents, last = dotted.split(".")
        for p in parents:
            target = getattr(target, p)
        setattr(target, last, value)
    return config
