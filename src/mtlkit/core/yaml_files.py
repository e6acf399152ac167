"""Reading YAML configuration files with clear errors (shared by the run and merge configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mtlkit.errors import ConfigError


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file (an empty file gives ``{}``); a missing file,
    invalid YAML or another top-level type raises :class:`~mtlkit.errors.ConfigError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {path} does not exist.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}.")
    return raw
