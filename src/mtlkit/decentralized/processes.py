"""One agent per ``torch.distributed`` process: each rank adapts its own agent, the messages are
exchanged with ``all_gather`` (gloo on CPU, NCCL on GPU), and each rank combines its own
neighbours' messages with its own rule. The arithmetic is :class:`DecentralizedNetwork`'s, so a
multi-process run ends with the single-process run's models.

``build(rank, world_size)`` must return the whole network (every rank builds the same one, seeded;
only its own agent is stepped).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtlkit.decentralized.network import DecentralizedNetwork
from mtlkit.errors import ConfigError

Builder = Callable[[int, int], DecentralizedNetwork]


def run_agent(network: DecentralizedNetwork, steps: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """This rank's agent for ``steps`` steps inside an initialised process group; returns its final
    model and its combination weights at every step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != len(network.agents):
        raise ConfigError(f"{len(network.agents)} agents need as many processes, got {world}.")
    history: list[torch.Tensor | None] = []
    for step in range(steps):
        message = network.adapt(rank, step).contiguous()
        gathered = [torch.empty_like(message) for _ in range(world)]
        dist.all_gather(gathered, message)
        history.append(network.combine(rank, torch.stack(gathered)))
    return network.w[rank], history


def _worker(rank: int, world: int, build: Builder, steps: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        w, history = run_agent(build(rank, world), steps)
        torch.save({"w": w, "weights": history}, Path(out_dir) / f"agent{rank}.pt")
        dist.barrier()  # gloo aborts a process whose peer tears the connections down mid-work
    finally:
        dist.destroy_process_group()


def spawn(build: Builder, world_size: int, steps: int) -> list[dict[str, Any]]:
    """Run ``world_size`` agent processes on this machine (gloo) and return each agent's final
    model and weight history, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_worker, args=(world_size, build, steps, init_file, tmp), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"agent{k}.pt", weights_only=True) for k in range(world_size)]
