"""Model merging: task vectors and merging methods on any ``nn.Module``, state dict or
safetensors checkpoint (``merge(pretrained, experts, method=...) -> MergeResult``)."""

from mtlkit.merging.average import WeightAveraging
from mtlkit.merging.base import MERGERS, Merger
from mtlkit.merging.dare import DARE
from mtlkit.merging.merge import MergeResult, available, merge, recalibrate_batchnorm
from mtlkit.merging.sources import MemorySource, SafetensorsSource, TensorSource, open_source
from mtlkit.merging.task_arithmetic import TaskArithmetic
from mtlkit.merging.ties import TIES

__all__ = [
    "DARE",
    "MERGERS",
    "TIES",
    "MemorySource",
    "MergeResult",
    "Merger",
    "SafetensorsSource",
    "TaskArithmetic",
    "TensorSource",
    "WeightAveraging",
    "available",
    "merge",
    "open_source",
    "recalibrate_batchnorm",
]
