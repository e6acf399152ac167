"""Running the Trainer under ``torchrun``: the process group from the launcher's environment, the
model in ``DistributedDataParallel``, and each rank's shard of every global batch.

``torchrun --nproc_per_node 2 -m mtlkit.cli train CONFIG.yaml`` (or ``--nnodes``/``--rdzv-*`` for
several machines, exactly as torchrun documents) trains with ``data.batch_size`` as the *global*
batch: each of the R ranks gets ``batch_size / R`` samples of it, so a configuration means the same
training on one process or many (the same update for unshuffled data; a shuffled run draws another
sample order, see ``docs/distributed.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from mtlkit.core.distributed import leave_process_group
from mtlkit.data.base import _keep_batch
from mtlkit.errors import ConfigError


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class DistributedRun:
    """This process's place in a data-parallel job."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "auto") -> DistributedRun:
    """Join the job that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on CUDA, gloo on the CPU; one GPU per
    process, chosen by the local rank. Joins once; later calls return the same description."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"Under torchrun the device is 'auto', 'cpu' or 'cuda' (one per rank); got {device!r}."
        )
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but CUDA is not available.")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    where = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistributedRun(dist.get_rank(), dist.get_world_size(), where)


def wrap(model: nn.Module, run: DistributedRun) -> DistributedDataParallel:
    """``model`` on the rank's device inside ``DistributedDataParallel`` (parameters broadcast from
    rank 0, so every rank starts from the same weights)."""
    model = model.to(run.device)
    ids = [run.device.index] if run.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_loader(
    dataset: Dataset, global_batch: int, run: DistributedRun, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """This rank's loader: ``global_batch / world_size`` samples of every global batch (the Trainer
    calls the sampler's ``set_epoch`` at each epoch). Rank r reads samples r, r + R, r + 2R, ...,
    so without shuffling the ranks' batches together are the one-process batches in order."""
    if global_batch % run.world_size:
        raise ConfigError(
            f"data.batch_size ({global_batch}) is the global batch; it must divide evenly over the "
            f"{run.world_size} ranks."
        )
    sampler: DistributedSampler = DistributedSampler(
        dataset, run.world_size, run.rank, shuffle=shuffle, seed=seed
    )
    return DataLoader(dataset, global_batch // run.world_size, sampler=sampler, collate_fn=_keep_batch)


def finish() -> None:
    """Leave the job: wait for every rank, then destroy the process group (nothing when none;
    see :func:`mtlkit.core.distributed.leave_process_group`)."""
    leave_process_group()
