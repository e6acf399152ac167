"""YAML run configurations validated into typed dataclasses.

Every key is checked before anything is loaded or built: an unknown key, a wrong type or a value
out of range raises :class:`~mtlkit.errors.ConfigError` naming the key (with close matches for
typos). :func:`check_components` then checks the names and ``options`` of the dataset, model and
method against the registries and the components' own declared parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlkit.core.yaml_files import read_yaml_mapping
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    container = {dict: dict, list: list}.get(origin)
    if container is not None:
        if not isinstance(value, container):
            raise ConfigError(
                f"{key}: expected a {'mapping' if container is dict else 'list'}, got {type(value).__name__}."
            )
        if container is dict and not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: option names must be strings, got {sorted(map(repr, value))}.")
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
    """Read and validate a YAML run configuration (``overrides``: dotted keys, validated too)."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    for dotted, value in (overrides or {}).items():
        target = raw
        *parents, last = dotted.split(".")
        for p in parents:
            inner = target.get(p)
            if inner is None:
                inner = target[p] = {}
            if not isinstance(inner, dict):
                raise ConfigError(f"{p}: expected a mapping, got {type(inner).__name__}.")
            target = inner
        target[last] = value
    config = from_dict(RunConfig, raw)
    check_values(config)
    return config


_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
OPTIMIZERS = ("adam", "adamw", "sgd")


def _at_least(key: str, value: Any, low: float, strict: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number; got {value!r}.")
    ok = value > low if strict else value >= low
    if not ok:
        raise ConfigError(
            f"{key} must be {'>' if strict else '>='} {low:g}{' or null' if optional else ''}; got {value!r}."
        )


def check_values(cfg: RunConfig) -> None:
    """Ranges and enumerations of every field (types were checked by :func:`from_dict`)."""
    _at_least("data.batch_size", cfg.data.batch_size, 1)
    _at_least("data.eval_batch_size", cfg.data.eval_batch_size, 1)
    _at_least("optimizer.lr", cfg.optimizer.lr, 0, strict=True)
    _at_least("optimizer.weight_decay", cfg.optimizer.weight_decay, 0)
    _at_least("optimizer.momentum", cfg.optimizer.momentum, 0)
    if cfg.optimizer.name.lower() not in OPTIMIZERS:
        close = difflib.get_close_matches(cfg.optimizer.name.lower(), OPTIMIZERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"optimizer.name: unknown optimizer {cfg.optimizer.name!r}.{hint} Available: {', '.join(OPTIMIZERS)}."
        )
    t = cfg.trainer
    _at_least("trainer.epochs", t.epochs, 0)
    _at_least("trainer.log_every", t.log_every, 1)
    _at_least("trainer.checkpoint_every", t.checkpoint_every, 1, optional=True)
    _at_least("trainer.keep_checkpoints", t.keep_checkpoints, 1)
    _at_least("trainer.grad_clip", t.grad_clip, 0, strict=True, optional=True)
    if not _DEVICE.match(t.device):
        raise ConfigError(
            f"trainer.device: {t.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps."
        )
    if t.amp not in (False, True, "bf16", "fp16"):
        raise ConfigError(f"trainer.amp must be false, true, bf16 or fp16; got {t.amp!r}.")
    es = t.early_stopping
    if es is not None:
        _at_least("trainer.early_stopping.patience", es.patience, 1)
        _at_least("trainer.early_stopping.min_delta", es.min_delta, 0)
        if es.mode not in ("auto", "max", "min"):
            raise ConfigError(f"trainer.early_stopping.mode must be auto, max or min; got {es.mode!r}.")
    if not cfg.output:
        raise ConfigError("output must name a directory.")


def check_options(
    key: str, factory: Any, options: dict[str, Any], given_by_run: tuple[str, ...] = ()
) -> None:
    """Refuse option names that ``factory`` does not take (with close matches); ``given_by_run``
    are arguments the run fills in itself (``in_features``, ``tasks``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n in params if n not in given_by_run and n != "self"]
    for name in options:
        if name in given_by_run:
            raise ConfigError(f"{key}.{name} is set by the run itself; remove it from the config.")
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown option {key}.{name}.{hint} Allowed: {', '.join(allowed) or '(none)'}."
            )


def check_components(cfg: RunConfig) -> None:
    """Names and options of the dataset, model and method, against the registries: every error a
    run would meet when building them, raised before the data is loaded."""
    from mtlkit.data import DATASETS
    from mtlkit.methods import create as create_method
    from mtlkit.models import MODELS

    check_options("data.options", DATASETS.get(cfg.data.name), cfg.data.options)
    check_options("model.options", MODELS.get(cfg.model.name), cfg.model.options, ("in_features", "tasks"))
    try:
        create_method(cfg.method.name, **cfg.method.options)  # validates every declared option
    except ConfigError as exc:
        raise ConfigError(f"method.options: {exc}") from exc
