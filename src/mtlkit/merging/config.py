"""Merge configurations: mtlkit's YAML, and mergekit's YAML for the data-free methods (so its
users can bring their configs), validated into one :class:`MergeConfig`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlkit.core.yaml_files import read_yaml_mapping
from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging.base import MERGERS

OURS = {"method", "pretrained", "experts", "output", "batchnorm", "precision"}


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
    precision: str = "float64"
    notes: list[str] = field(default_factory=list)


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read ``path``: mtlkit's format (``method: {name, options}``, ``pretrained``, ``experts:
    {name: path}``, ``output``) or mergekit's (``merge_method``, ``base_model``, ``models``)."""
    path = Path(path)
    raw = read_yaml_mapping(path)
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
        precision=str(raw.get("precision", "float64")),
    )


#: mergekit method -> (mtlkit method, fixed options, mergekit's default ``normalize``)
MERGEKIT_METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "linear": ("average", {}, True),
    "task_arithmetic": ("task_arithmetic", {}, False),
    "ties": ("ties", {"trim_scope": "per_tensor", "sign_rule": "mass", "rounding": "floor"}, True),
    "dare_linear": ("dare", {"combine": "task_arithmetic", "rescale": "l1"}, False),
    "dare_ties": ("dare", {"combine": "ties", "rescale": "l1"}, False),
    "breadcrumbs": ("breadcrumbs", {}, False),
    "della": ("della", {"rescale": "l1"}, True),
    "slerp": ("slerp", {}, False),
    "model_stock": ("model_stock", {}, False),
}
#: mergekit parameters mtlkit translates, and top-level keys that do not change the weights
PARAMETERS = {"weight", "density", "lambda", "epsilon", "gamma", "t", "normalize", "int8_mask"}
NOT_WEIGHTS = {"dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"}
TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "output", *NOT_WEIGHTS}


def _scalar(value: Any, key: str, path: Path) -> Any:
    if isinstance(value, (list, dict)):
        raise ConfigError(
            f"{path}: parameter {key!r} is a gradient or a filter ({type(value).__name__}); mtlkit takes one value."
        )
    return value


def from_mergekit(raw: dict[str, Any], path: Path) -> MergeConfig:
    """Translate a mergekit config with mergekit's semantics: a model's parameter wins over the
    global one, which wins over mergekit's default (``density`` 1, i.e. no sparsification;
    ``lambda`` 1; ``epsilon`` 0.15; ``gamma`` 0.01; ``normalize`` per method); per-model
    ``weight`` becomes ``weights``; ``normalize`` picks the disjoint mean or sum (TIES-style
    methods) or normalises the weights (task-arithmetic ones). mtlkit takes one ``density`` (and
    ``epsilon``, ``gamma``) for every model. Gradients and filters, unknown parameters and unknown
    keys are refused by name; keys that do not change the weights (``dtype``, tokenizer settings)
    are noted in ``MergeConfig.notes``."""
    method = str(raw["merge_method"])
    if method not in MERGEKIT_METHODS:
        raise unknown_name("mergekit merge_method", method, MERGEKIT_METHODS)
    unknown_keys = set(raw) - TOP_LEVEL
    if unknown_keys:
        raise ConfigError(f"{path}: mergekit key(s) {sorted(unknown_keys)} have no mtlkit counterpart.")
    name, fixed, default_normalize = MERGEKIT_METHODS[method]
    models = raw.get("models") or []
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: models must be a list of {{model: path, parameters: {{...}}}}.")
    glob = {k: _scalar(v, k, path) for k, v in (raw.get("parameters") or {}).items()}
    base = _path(raw.get("base_model"), path)
    entries: list[tuple[str, dict[str, Any]]] = []
    for entry in models:
        model = entry.get("model") if isinstance(entry, dict) else entry
        if not isinstance(model, str):
            raise ConfigError(f"{path}: every entry of models needs a model path.")
        params = (entry.get("parameters") or {}) if isinstance(entry, dict) else {}
        entries.append((str(_path(model, path)), {k: _scalar(v, k, path) for k, v in params.items()}))
    for key in {k for _, p in entries for k in p} | set(glob):
        if key not in PARAMETERS:
            raise ConfigError(f"{path}: mergekit parameter {key!r} has no mtlkit counterpart.")
    pretrained: str | None = base
    if name == "slerp":  # the base is the interpolation's start (t = 0)
        if base is None:
            raise ConfigError(f"{path}: slerp needs base_model (its t = 0 end).")
        others = [e for e in entries if e[0] != base]
        entries = [(base, next((p for m, p in entries if m == base), {})), *others]
        pretrained = None
    elif name == "average":  # linear uses every listed model and no base
        pretrained = None
    else:
        entries = [e for e in entries if e[0] != base]
    if not entries:
        raise ConfigError(f"{path}: no models to merge besides the base.")

    def value(params: dict[str, Any], key: str, default: Any) -> Any:
        return params.get(key, glob.get(key, default))

    experts: dict[str, str] = {}
    for file, _ in entries:
        stem = Path(file).stem if Path(file).suffix else Path(file).name
        label, n = stem, 2
        while label in experts:
            label, n = f"{stem}_{n}", n + 1
        experts[label] = file
    options = dict(fixed)
    weights = [float(value(p, "weight", 1.0)) for _, p in entries]
    normalize = bool(value({}, "normalize", default_normalize))
    for key, default in (("density", 1.0), ("epsilon", 0.15), ("gamma", 0.01)):
        values = {float(value(p, key, default)) for _, p in entries}
        if len(values) > 1:
            raise ConfigError(f"{path}: mtlkit takes one {key!r} for every model, got {sorted(values)}.")
    density = float(value(entries[0][1], "density", 1.0))
    if name == "slerp":
        options["t"] = float(value({}, "t", 0.5))
    elif name == "average":
        if not normalize:
            raise ConfigError(
                f"{path}: linear with normalize: false (a plain weighted sum) is not supported."
            )
        options["weights"] = weights
    elif name == "model_stock":
        pass
    else:
        options["scaling"] = float(value({}, "lambda", 1.0))
        consensus = name == "ties" or (name == "dare" and fixed["combine"] == "ties") or name == "della"
        if consensus:
            options["weights"] = weights
            options["aggregate"] = "disjoint_mean" if normalize else "disjoint_sum"
        else:
            total = sum(weights)
            options["weights"] = [w / total for w in weights] if normalize and total else weights
        if name == "ties":
            options["density"] = density
        elif name == "dare":
            options["drop_rate"] = 1.0 - density
        elif name == "della":
            options["density"] = density
            options["epsilon"] = float(value(entries[0][1], "epsilon", 0.15))
        elif name == "breadcrumbs":
            options["density"] = density
            options["top"] = float(value(entries[0][1], "gamma", 0.01))
    cfg = MergeConfig(
        name,
        pretrained,
        experts,
        str(_path(raw.get("output", "merged.safetensors"), path)),
        options,
        source="mergekit",
    )
    cfg.notes = [
        f"{k} is not applied: mtlkit keeps each tensor's dtype and merges weights only"
        for k in NOT_WEIGHTS & set(raw)
    ]
    return cfg


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
