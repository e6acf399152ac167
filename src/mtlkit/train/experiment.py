"""Turn a validated :class:`~mtlkit.train.config.RunConfig` into a trained model and a report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtlkit import data as mk_data
from mtlkit import methods as mk_methods
from mtlkit import models as mk_models
from mtlkit.core.contract import parameter_groups
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError, unknown_name
from mtlkit.train import Callback, EarlyStopping, EvaluationReport, Trainer
from mtlkit.train.config import OPTIMIZERS, RunConfig, check_components
from mtlkit.train.distributed import init_from_env, launched, shard_loader, wrap


@dataclass
class RunResult:
    config: RunConfig
    trainer: Trainer
    test: EvaluationReport
    seconds: float
    output: Path


def make_optimizer(cfg: RunConfig, params: Any) -> torch.optim.Optimizer:
    o = cfg.optimizer
    name = o.name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    raise unknown_name("optimizer", o.name, OPTIMIZERS)


def select_tasks(tasks: TaskSet, names: Sequence[str] | None) -> TaskSet:
    if names is None:
        return tasks
    return TaskSet([tasks[n] for n in names])


def run(
    cfg: RunConfig,
    dataset: Any | None = None,
    task_names: Sequence[str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train as configured, evaluate on the test split (with Δm% when a reference is set).

    ``dataset`` replaces the configured one (already loaded), ``task_names`` trains a subset of its
    tasks (a single-task baseline), ``callbacks`` go to the Trainer.

    Started by ``torchrun`` with several ranks, the model trains in ``DistributedDataParallel``
    with ``data.batch_size`` as the global batch (:mod:`mtlkit.train.distributed`); every rank
    evaluates the whole validation and test splits, and rank 0 writes the outputs.
    """
    check_components(cfg)
    torch.manual_seed(cfg.seed)
    dataset = dataset if dataset is not None else mk_data.load(cfg.data.name, **cfg.data.options)
    tasks = select_tasks(dataset.tasks, task_names)
    try:
        model = mk_models.create(
            cfg.model.name, in_features=dataset.in_features, tasks=tasks, **cfg.model.options
        )
    except TypeError as exc:
        raise ConfigError(f"model.options: {exc}") from exc
    method = mk_methods.create(cfg.method.name, **cfg.method.options)
    t = cfg.trainer
    es = t.early_stopping
    output = Path(cfg.output)
    device: str | torch.device = t.device
    parallel = init_from_env(t.device) if launched() else None
    if parallel is not None:
        model, device = wrap(model, parallel), parallel.device
        train_loader = shard_loader(dataset.train, cfg.data.batch_size, parallel, shuffle=True, seed=cfg.seed)
    else:
        train_loader = mk_data.loader(dataset.train, cfg.data.batch_size, shuffle=True)
    trainer = Trainer(
        model,
        tasks,
        method,
        make_optimizer(cfg, parameter_groups(model, cfg.optimizer.lr, cfg.optimizer.weight_decay)),
        device=device,
        log_dir=output,
        checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints,
        grad_clip=t.grad_clip,
        amp=t.amp,  # type: ignore[arg-type]  # checked by check_values
        early_stopping=EarlyStopping(es.monitor, es.patience, es.min_delta, es.mode) if es else None,  # type: ignore[arg-type]
        reference=cfg.reference,
        seed=cfg.seed,
        progress=t.progress,
        log_every=t.log_every,
        tensorboard=t.tensorboard,
        config=cfg.to_dict(),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(train_loader, mk_data.loader(dataset.val, cfg.data.eval_batch_size), epochs=t.epochs)
    seconds = time.perf_counter() - start
    report = trainer.evaluate(mk_data.loader(dataset.test, cfg.data.eval_batch_size))
    if trainer.is_main:
        report.save(output / "test_report.json")
    return RunResult(cfg, trainer, report, seconds, output)
