"""Multi-task optimisation methods: loss weightings and gradient aggregators."""

from mtlkit.methods.base import Hook, Method, StepInfo, StepInputs
from mtlkit.methods.cagrad import CAGrad
from mtlkit.methods.driver import Driver, add_param_groups
from mtlkit.methods.dualproj import DualProj
from mtlkit.methods.dwa import DWA
from mtlkit.methods.ew import EW
from mtlkit.methods.fairgrad import FairGrad
from mtlkit.methods.famo import FAMO
from mtlkit.methods.gls import GLS
from mtlkit.methods.gradient_methods import GradientMethod, GramianWeighting, JacobianAggregator
from mtlkit.methods.gradnorm import GradNorm
from mtlkit.methods.imtl_l import IMTLL
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.mgda import MGDA
from mtlkit.methods.min_norm import min_norm_weights
from mtlkit.methods.nash_mtl import NashMTL
from mtlkit.methods.registry import METHODS, available, create, method_class, register, register_variant
from mtlkit.methods.rlw import RLW
from mtlkit.methods.si import SI
from mtlkit.methods.stch import STCH
from mtlkit.methods.upgrad import UPGrad
from mtlkit.methods.uw import UW

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
    "CAGrad",
    "Driver",
    "DualProj",
    "FairGrad",
    "GradNorm",
    "GradientMethod",
    "GramianWeighting",
    "Hook",
    "JacobianAggregator",
    "LossWeighting",
    "Method",
    "NashMTL",
    "StepInfo",
    "StepInputs",
    "UPGrad",
    "add_param_groups",
    "available",
    "create",
    "method_class",
    "min_norm_weights",
    "register",
    "register_variant",
]
