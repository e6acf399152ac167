"""mtlkit: multi-task learning on PyTorch.

>>> import mtlkit as mk
>>> tasks = mk.TaskSet([mk.Task("a", loss="mse"), mk.Task("b", loss="bce")])
>>> method = mk.methods.create("mgda")
"""

from mtlkit import errors
from mtlkit.core.engine import GradientEngine
from mtlkit.core.tasks import Batch, Task, TaskLosses, TaskSet

__version__ = "0.1.0"

__all__ = ["Batch", "GradientEngine", "Task", "TaskLosses", "TaskSet", "__version__", "errors"]


def __getattr__(name: str):
    # Sub-packages load on first use so `import mtlkit` stays light (the CLI lists names fast).
    import importlib

    if name in {"methods", "models", "data", "metrics", "train"}:
        return importlib.import_module(f"mtlkit.{name}")
    if name in {"Trainer", "EvaluationReport"}:
        return getattr(importlib.import_module("mtlkit.train"), name)
    raise AttributeError(f"module 'mtlkit' has no attribute {name!r}")
