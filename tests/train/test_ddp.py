"""The Trainer under DistributedDataParallel with real processes (gloo): two ranks, each with half of
every global batch, end with the weights of one process trained on the whole batches."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import mtlkit as mk
from mtlkit.data.base import MultiTaskTensorDataset, _keep_batch

TASKS = mk.TaskSet([mk.Task("a", "mse"), mk.Task("b", "bce")])


def _dataset() -> MultiTaskTensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    return MultiTaskTensorDataset(x, {"a": x[:, 0] + 0.1 * x[:, 1], "b": (x[:, 2] > 0).float()})


def _train(model: torch.nn.Module, loader, method: str) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mk.Trainer(model, TASKS, method, optimizer, device="cpu", progress=False, seed=0).fit(loader, epochs=2)


def _worker(rank: int, world: int, init: str, out: str, method: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = mk.models.SharedBottom(5, TASKS, bottom_dims=[8], tower_dims=[4])
        data = _dataset()
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        _train(
            DistributedDataParallel(model),
            DataLoader(data, 16, sampler=sampler, collate_fn=_keep_batch),
            method,
        )
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_equal_weighting_match_one_process_on_the_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "weights.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), out, "ew"), nprocs=2, join=True)
        two = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = mk.models.SharedBottom(5, TASKS, bottom_dims=[8], tower_dims=[4])
    _train(model, mk.data.loader(_dataset(), 32), "ew")  # the same global batches, in order
    for name, value in model.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6)
