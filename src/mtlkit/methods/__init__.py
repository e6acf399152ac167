"""Multi-task optimisation methods: loss weightings and gradient aggregators."""

from mtlkit.methods.base import GramianWeighting, LossWeighting, Method, StepInfo
from mtlkit.methods.ew import EW
from mtlkit.methods.mgda import MGDA
from mtlkit.methods.min_norm import min_norm_weights
from mtlkit.methods.registry import METHODS, available, create, register

__all__ = [
    "EW",
    "METHODS",
    "MGDA",
    "GramianWeighting",
    "LossWeighting",
    "Method",
    "StepInfo",
    "available",
    "create",
    "min_norm_weights",
    "register",
]
