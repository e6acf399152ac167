"""Merge configurations: mtlkit's YAML, and mergekit's YAML for the data-free methods (so its
users can bring their configs), validated into one :class:`MergeConfig`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging.base import MERGERS

OURS = {"method", "pretrained", "experts", "output", "batchnorm"}


@dataclass
class MergeConfig:
    """What ``mtlkit merge`` runs: ``merge(pretrained, experts, method, batchnorm, **options)`` and
    a save to ``output``."""

    method: str
    pretrained: str | None
    experts: dict[str, str]
    output: str
    options: dict[str, Any] = field(default_factory=dict)
    batchnorm: str = "merge"
    source: str = "mtlkit"


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read ``path``: mtlkit's format (``method: {name, options}``, ``pretrained``, ``experts:
    {name: path}``, ``output``) or mergekit's (``merge_method``, ``base_model``, ``models``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {path} does not exist.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level.")
    cfg = from_mergekit(raw, path) if "merge_method" in raw else from_ours(raw, path)
    check_method_options(cfg.method, cfg.options)
    return cfg


def from_ours(raw: dict[str, Any], path: Path) -> MergeConfig:
    unknown = set(raw) - OURS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(OURS)}.")
    method = raw.get("method")
    if isinstance(method, str):
        name, options = method, {}
    elif isinstance(method, dict) and isinstance(method.get("name"), str):
        name, options = method["name"], dict(method.get("options") or {})
    else:
        raise ConfigError(f"{path}: method must be a name or {{name: ..., options: {{...}}}}.")
    experts = raw.get("experts")
    if not isinstance(experts, dict) or not experts:
        raise ConfigError(f"{path}: experts must map names to checkpoint paths.")
    if "output" not in raw:
        raise ConfigError(f"{path}: output (a .safetensors path) is required.")
    return MergeConfig(
        name,
        _path(raw.get("pretrained"), path),
        {str(k): str(_path(v, path)) for k, v in experts.items()},
        str(_path(raw["output"], path)),
        options,
        str(raw.get("batchnorm", "merge")),
    )


#: mergekit method -> (mtlkit method, fixed options)
MERGEKIT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {"trim_scope": "per_tensor"}),
    "dare_linear": ("dare", {"combine": "task_arithmetic", "rescale": "l1"}),
    "dare_ties": ("dare", {"combine": "ties", "rescale": "l1"}),
    "breadcrumbs": ("breadcrumbs", {}),
    "della": ("della", {"rescale": "l1"}),
    "slerp": ("slerp", {}),
    "model_stock": ("model_stock", {}),
}


def from_mergekit(raw: dict[str, Any], path: Path) -> MergeConfig:
    """Translate a mergekit config. Per-model ``weight`` becomes ``weights``; per-model
    ``density`` (one value for every model, since mtlkit's methods take one) becomes the method's
    density or drop rate; ``lambda`` the scaling (mergekit's default 1.0); ``epsilon``, ``gamma``
    and ``t`` carry over. Anything else is refused by name rather than ignored."""
    method = str(raw["merge_method"])
    if method not in MERGEKIT_METHODS:
        raise unknown_name("mergekit merge_method", method, MERGEKIT_METHODS)
    name, options = MERGEKIT_METHODS[method]
    options = dict(options)
    models = raw.get("models") or []
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: models must be a list of {{model: path, parameters: {{...}}}}.")
    experts: dict[str, str] = {}
    per_model: dict[str, list[Any]] = {}
    for entry in models:
        model = entry.get("model") if isinstance(entry, dict) else entry
        if not isinstance(model, str):
            raise ConfigError(f"{path}: every entry of models needs a model path.")
        experts[Path(model).stem or model] = str(_path(model, path))
        for key, value in ((entry.get("parameters") or {}) if isinstance(entry, dict) else {}).items():
            per_model.setdefault(key, []).append(value)
    base = raw.get("base_model")
    if base is not None and str(_path(base, path)) in experts.values():
        experts = {k: v for k, v in experts.items() if v != str(_path(base, path))}
    params = dict(raw.get("parameters") or {})
    for key, values in per_model.items():
        if len(values) != len(models) and key != "weight":
            raise ConfigError(f"{path}: parameter {key!r} is given for some models only.")
        params.setdefault(key, values if key == "weight" else values[0])
        if key != "weight" and len(set(map(str, values))) > 1:
            raise ConfigError(f"{path}: mtlkit takes one {key!r} for every model, got {values}.")
    translated = _translate(method, name, params, path)
    options.update(translated)
    unknown = set(params) - TRANSLATED_KEYS
    if unknown:
        raise ConfigError(f"{path}: mergekit parameter(s) {sorted(unknown)} have no mtlkit counterpart.")
    return MergeConfig(
        name,
        str(_path(base, path)) if base is not None else None,
        experts,
        str(_path(raw.get("output", "merged.safetensors"), path)),
        options,
        source="mergekit",
    )


TRANSLATED_KEYS = {"weight", "density", "lambda", "epsilon", "gamma", "t", "normalize"}


def _translate(method: str, name: str, params: dict[str, Any], path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "weight" in params and name not in ("slerp", "model_stock"):
        weights = params["weight"]
        out["weights"] = [float(w) for w in (weights if isinstance(weights, list) else [weights])]
    if "lambda" in params:
        out["scaling"] = float(params["lambda"])
    elif name in ("task_arithmetic", "ties", "dare", "breadcrumbs", "della"):
        out["scaling"] = 1.0  # mergekit's default lambda
    if "density" in params:
        density = float(params["density"])
        if name == "ties":
            out["density"] = density
        elif name == "dare":
            out["drop_rate"] = 1.0 - density
        elif name == "della":
            out["density"] = density
        elif name == "breadcrumbs":
            gamma = float(params.get("gamma", 0.01))
            out["top"], out["bottom"] = gamma, max(0.0, 1.0 - density - gamma)
    if "epsilon" in params:
        out["epsilon"] = float(params["epsilon"])
    if "t" in params:
        out["t"] = float(params["t"])
    if params.get("normalize") is False and name == "ties":
        out["aggregate"] = "disjoint_sum"
    return out


def check_method_options(method: str, options: dict[str, Any]) -> None:
    factory = MERGERS.get(method)
    allowed = [n for n in inspect.signature(factory).parameters if n != "self"]
    for key in options:
        if key not in allowed:
            raise ConfigError(f"{method} takes no option {key!r}; it takes {allowed}.")


def _path(value: Any, config: Path) -> str | None:
    """Paths in a config are relative to the config file."""
    if value is None:
        return None
    p = Path(str(value))
    return str(p if p.is_absolute() else (config.parent / p))
