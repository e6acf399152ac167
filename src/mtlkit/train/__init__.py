"""Training: the Trainer, evaluation reports and Δm%, checkpoints and logs."""

from mtlkit.train.checkpoint import load_checkpoint, save_checkpoint
from mtlkit.train.evaluate import EvaluationReport
from mtlkit.train.trainer import EarlyStopping, Trainer, resolve_device

__all__ = [
    "EarlyStopping",
    "EvaluationReport",
    "Trainer",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
]
