"""Training: the Trainer, its callbacks, evaluation reports and Δm%, checkpoints and logs."""

from mtlkit.train.callbacks import Callback
from mtlkit.train.checkpoint import load_checkpoint, resumable_checkpoint, save_checkpoint
from mtlkit.train.device import Precision, resolve_device
from mtlkit.train.early_stopping import EarlyStopping
from mtlkit.train.evaluate import EvaluationReport, evaluate, predict
from mtlkit.train.logging import LoggingCallback
from mtlkit.train.snapshot_perturbation import SnapshotPerturbation
from mtlkit.train.trainer import Trainer

__all__ = [
    "Callback",
    "EarlyStopping",
    "EvaluationReport",
    "LoggingCallback",
    "Precision",
    "SnapshotPerturbation",
    "Trainer",
    "evaluate",
    "load_checkpoint",
    "predict",
    "resolve_device",
    "resumable_checkpoint",
    "save_checkpoint",
]
