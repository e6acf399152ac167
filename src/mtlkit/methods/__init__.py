"""Multi-task optimisation methods: loss weightings and gradient aggregators."""

from mtlkit.methods.base import GramianWeighting, LossWeighting, Method, StepInfo
from mtlkit.methods.dwa import DWA
from mtlkit.methods.ew import EW
from mtlkit.methods.famo import FAMO
from mtlkit.methods.gradnorm import GradNorm
from mtlkit.methods.learned_scales import IMTLL, UW
from mtlkit.methods.mgda import MGDA
from mtlkit.methods.min_norm import min_norm_weights
from mtlkit.methods.registry import METHODS, available, create, register
from mtlkit.methods.rlw import RLW
from mtlkit.methods.scalarization import GLS, SI
from mtlkit.methods.stch import STCH

__all__ = [
    "DWA",
    "EW",
    "FAMO",
    "GLS",
    "IMTLL",
    "METHODS",
    "MGDA",
    "RLW",
    "SI",
    "STCH",
    "UW",
    "GradNorm",
    "GramianWeighting",
    "LossWeighting",
    "Method",
    "StepInfo",
    "available",
    "create",
    "min_norm_weights",
    "register",
]
