"""One agent per ``torch.distributed`` process: each rank adapts its own agent, the messages are
exchanged with ``all_gather`` (gloo on CPU, NCCL on GPU), and each rank combines its own
neighbours' messages with its own rule. The arithmetic is :class:`DecentralizedNetwork`'s, so a
multi-process run ends with the single-process run's models.

``build(rank, world_size)`` must return the whole network (every rank builds the same one, seeded;
only its own agent is stepped).

Faults: with a checkpoint folder, every agent saves its own state every ``every`` steps; once all
have (a barrier), rank 0 commits that step in the folder's ``committed`` file (written atomically).
A job in which an agent process is killed stops (its peers wait in the exchange; the launcher --
``torchrun``, or :func:`spawn` -- ends them); started again on the same folder, every agent resumes
from the committed step and the run ends with the models of the uninterrupted run (the agents'
data streams must be functions of the step).
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

from mtlkit.core.distributed import leave_process_group
from mtlkit.decentralized.network import DecentralizedNetwork
from mtlkit.errors import ConfigError

Builder = Callable[[int, int], DecentralizedNetwork]


def run_agent(
    network: DecentralizedNetwork,
    steps: int,
    checkpoint_dir: str | Path | None = None,
    every: int = 10,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """This rank's agent for ``steps`` steps inside an initialised process group; returns its final
    model and its combination weights at every step it ran (from the committed step on when it
    resumed from ``checkpoint_dir``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != len(network.agents):
        raise ConfigError(f"{len(network.agents)} agents need as many processes, got {world}.")
    if every < 1:
        raise ConfigError(f"every must be >= 1, got {every}.")
    start = 0
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        start = _resume(network, rank, folder)
    history: list[torch.Tensor | None] = []
    for step in range(start, steps):
        message = network.adapt(rank, step).contiguous()
        gathered = [torch.empty_like(message) for _ in range(world)]
        dist.all_gather(gathered, message)
        history.append(network.combine(rank, torch.stack(gathered)))
        if folder is not None and (step + 1) % every == 0:
            _checkpoint(network, rank, step + 1, folder)
    return network.w[rank], history


COMMITTED = "committed"


def _agent_file(folder: Path, rank: int, step: int) -> Path:
    return folder / f"agent{rank:05d}-step{step:09d}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _checkpoint(network: DecentralizedNetwork, rank: int, step: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save(network.agent_state(rank), _agent_file(folder, rank, step))
    dist.barrier()  # every agent holds step's state: it can be committed
    if rank == 0:
        tmp = folder / f".{COMMITTED}.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, folder / COMMITTED)
    dist.barrier()  # committed for everyone: older states can go
    for old in folder.glob(f"agent{rank:05d}-step*.pt"):
        if old != _agent_file(folder, rank, step):
            old.unlink()


def _resume(network: DecentralizedNetwork, rank: int, folder: Path) -> int:
    marker = folder / COMMITTED
    if not marker.exists():
        return 0
    step = int(marker.read_text())
    path = _agent_file(folder, rank, step)
    if not path.exists():
        raise ConfigError(f"Agent {rank} has no state for the committed step {step} in {folder}.")
    network.load_agent_state(rank, torch.load(path, weights_only=True))
    return step


def _worker(
    rank: int,
    world: int,
    build: Builder,
    steps: int,
    init_file: str,
    out_dir: str,
    checkpoint_dir: str | None,
    every: int,
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        w, history = run_agent(build(rank, world), steps, checkpoint_dir, every)
        torch.save({"w": w, "weights": history}, Path(out_dir) / f"agent{rank}.pt")
    finally:
        leave_process_group()


def spawn(
    build: Builder,
    world_size: int,
    steps: int,
    checkpoint_dir: str | Path | None = None,
    every: int = 10,
) -> list[dict[str, Any]]:
    """Run ``world_size`` agent processes on this machine (gloo) and return each agent's final
    model and weight history, in rank order (with ``checkpoint_dir``: resumable, see the module
    docstring; a killed agent process raises ``torch.multiprocessing.ProcessExitedException``)."""
    folder = str(checkpoint_dir) if checkpoint_dir is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(
            _worker,
            args=(world_size, build, steps, init_file, tmp, folder, every),
            nprocs=world_size,
            join=True,
        )
        return [torch.load(Path(tmp) / f"agent{k}.pt", weights_only=True) for k in range(world_size)]
