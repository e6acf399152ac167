"""Multi-task optimisation methods: loss weightings and gradient aggregators."""

from mtlkit.methods.agd import AGD
from mtlkit.methods.aligned_mtl import AlignedMTL
from mtlkit.methods.base import Hook, Method, StepInfo, StepInputs
from mtlkit.methods.cagrad import CAGrad
from mtlkit.methods.conflictfree import ConFIG
from mtlkit.methods.coordinate_median import CoordinateMedian
from mtlkit.methods.cosmos import COSMOS
from mtlkit.methods.db_mtl import DBMTL
from mtlkit.methods.dibs_mtl import DiBSMTL
from mtlkit.methods.driver import Driver, add_param_groups
from mtlkit.methods.dualproj import DualProj
from mtlkit.methods.dwa import DWA
from mtlkit.methods.epo import EPO
from mtlkit.methods.ew import EW
from mtlkit.methods.excess_mtl import ExcessMTL
from mtlkit.methods.fairgrad import FairGrad
from mtlkit.methods.famo import FAMO
from mtlkit.methods.fmtl import FMTL
from mtlkit.methods.fuller import FULLER
from mtlkit.methods.gls import GLS
from mtlkit.methods.graddrop import GradDrop
from mtlkit.methods.gradient_methods import GradientMethod, GramianWeighting, JacobianAggregator
from mtlkit.methods.gradnorm import GradNorm
from mtlkit.methods.gradvac import GradVac
from mtlkit.methods.imtl import IMTL
from mtlkit.methods.imtl_g import IMTLG
from mtlkit.methods.imtl_l import IMTLL
from mtlkit.methods.krum import Krum
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.ls import LinearScalarization
from mtlkit.methods.mgda import MGDA
from mtlkit.methods.min_norm import min_norm_weights
from mtlkit.methods.moco import MoCo
from mtlkit.methods.modo import MoDo
from mtlkit.methods.nash_mtl import NashMTL
from mtlkit.methods.pcd import PCD
from mtlkit.methods.pcgrad import PCGrad
from mtlkit.methods.pmtl import PMTL
from mtlkit.methods.preferences import PreferenceMethod
from mtlkit.methods.registry import METHODS, available, create, method_class, register, register_variant
from mtlkit.methods.rep_mtl import RepMTL
from mtlkit.methods.rlw import RLW
from mtlkit.methods.sdmgrad import SDMGrad
from mtlkit.methods.si import SI
from mtlkit.methods.stch import STCH
from mtlkit.methods.trimmed_mean import TrimmedMean
from mtlkit.methods.upgrad import UPGrad
from mtlkit.methods.uw import UW

__all__ = [
    "AGD",
    "COSMOS",
    "DBMTL",
    "DWA",
    "EPO",
    "EW",
    "FAMO",
    "FMTL",
    "FULLER",
    "GLS",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "METHODS",
    "MGDA",
    "PCD",
    "PMTL",
    "RLW",
    "SI",
    "STCH",
    "UW",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "CoordinateMedian",
    "DiBSMTL",
    "Driver",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientMethod",
    "GramianWeighting",
    "Hook",
    "JacobianAggregator",
    "Krum",
    "LinearScalarization",
    "LossWeighting",
    "Method",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "PreferenceMethod",
    "RepMTL",
    "SDMGrad",
    "StepInfo",
    "StepInputs",
    "TrimmedMean",
    "UPGrad",
    "add_param_groups",
    "available",
    "create",
    "method_class",
    "min_norm_weights",
    "register",
    "register_variant",
]
