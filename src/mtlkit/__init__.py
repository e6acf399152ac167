"""mtlkit: multi-task learning on PyTorch.

>>> import mtlkit as mk
>>> tasks = mk.TaskSet([mk.Task("a", loss="mse"), mk.Task("b", loss="bce")])
>>> method = mk.methods.create("mgda")
"""

from mtlkit import (
    bench,
    data,
    decentralized,
    errors,
    estimators,
    merging,
    methods,
    metrics,
    models,
    pareto,
    relatedness,
    train,
)
from mtlkit.core.contract import MultiTaskOutput
from mtlkit.core.engine import GradientEngine
from mtlkit.core.tasks import Batch, Task, TaskBatches, TaskLosses, TaskSet
from mtlkit.train import EvaluationReport, Trainer
from mtlkit.version import __version__

__all__ = [
    "Batch",
    "EvaluationReport",
    "GradientEngine",
    "MultiTaskOutput",
    "Task",
    "TaskBatches",
    "TaskLosses",
    "TaskSet",
    "Trainer",
    "__version__",
    "bench",
    "data",
    "decentralized",
    "errors",
    "estimators",
    "merging",
    "methods",
    "metrics",
    "models",
    "pareto",
    "relatedness",
    "train",
]
