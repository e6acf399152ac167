"""Multi-task architectures. Every model returns ``{task: output}`` and names its shared part."""

from typing import Any

from torch import nn

from mtlkit.models.base import MODELS, MultiTaskModel, MultiTaskModule, MultiTaskOutput, mlp
from mtlkit.models.mmoe import MMoE
from mtlkit.models.shared_bottom import SharedBottom


def create(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the model registered under ``name`` (see :func:`available`)."""
    return MODELS.create(name, **kwargs)


def available() -> list[str]:
    """Names of every registered model."""
    return MODELS.available()


__all__ = [
    "MODELS",
    "MMoE",
    "MultiTaskModel",
    "MultiTaskModule",
    "MultiTaskOutput",
    "SharedBottom",
    "available",
    "create",
    "mlp",
]
