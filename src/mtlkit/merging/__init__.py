"""Model merging: task vectors and merging methods on any ``nn.Module``, state dict or
safetensors checkpoint (``merge(pretrained, experts, method=...) -> MergeResult``)."""

from mtlkit.merging.adaptive import AdaMerging
from mtlkit.merging.average import WeightAveraging
from mtlkit.merging.base import MERGERS, Merger
from mtlkit.merging.breadcrumbs import Breadcrumbs
from mtlkit.merging.concrete import ConcreteAdaMerging, ConcreteTaskArithmetic
from mtlkit.merging.corruption import RobustTaskArithmetic, adversarial_contributor, gaussian_corruption
from mtlkit.merging.dare import DARE
from mtlkit.merging.della import DELLA
from mtlkit.merging.diagnostics import TaskVectorDiagnostics, diagnose
from mtlkit.merging.doge import DOGE
from mtlkit.merging.emr import EMR, TaskModulators
from mtlkit.merging.fisher import FisherMerging
from mtlkit.merging.isotropic import IsoC, IsoCTS
from mtlkit.merging.merge import MergeResult, available, merge, recalibrate_batchnorm
from mtlkit.merging.metagpt import MetaGPT
from mtlkit.merging.model_stock import ModelStock
from mtlkit.merging.regmean import RegMean, RegMeanPlusPlus
from mtlkit.merging.search import ScalingSearch, select_scaling
from mtlkit.merging.slerp import SLERP
from mtlkit.merging.sources import MemorySource, SafetensorsSource, TensorSource, open_source
from mtlkit.merging.task_arithmetic import TaskArithmetic
from mtlkit.merging.ties import TIES
from mtlkit.merging.tsv import TSVMerge
from mtlkit.merging.wudi import WUDI

__all__ = [
    "DARE",
    "DELLA",
    "DOGE",
    "EMR",
    "MERGERS",
    "SLERP",
    "TIES",
    "WUDI",
    "AdaMerging",
    "Breadcrumbs",
    "ConcreteAdaMerging",
    "ConcreteTaskArithmetic",
    "FisherMerging",
    "IsoC",
    "IsoCTS",
    "MemorySource",
    "MergeResult",
    "Merger",
    "MetaGPT",
    "ModelStock",
    "RegMean",
    "RegMeanPlusPlus",
    "RobustTaskArithmetic",
    "SafetensorsSource",
    "ScalingSearch",
    "TSVMerge",
    "TaskArithmetic",
    "TaskModulators",
    "TaskVectorDiagnostics",
    "TensorSource",
    "WeightAveraging",
    "adversarial_contributor",
    "available",
    "diagnose",
    "gaussian_corruption",
    "merge",
    "open_source",
    "recalibrate_batchnorm",
    "select_scaling",
]
