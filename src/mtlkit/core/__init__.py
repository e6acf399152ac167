"""Core: tasks, the gradient engine and registries. Imports nothing above this layer."""

from mtlkit.core.engine import GradientEngine, ParameterJacobian, RepresentationGradients
from mtlkit.core.registry import Registry
from mtlkit.core.tasks import Batch, Task, TaskBatches, TaskLosses, TaskSet

__all__ = [
    "Batch",
    "GradientEngine",
    "ParameterJacobian",
    "Registry",
    "RepresentationGradients",
    "Task",
    "TaskBatches",
    "TaskLosses",
    "TaskSet",
]
