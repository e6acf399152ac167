"""Data-parallel scaling on one machine: the Trainer on 1 and 2 gloo ranks (CPU), per method family,
with the communication volume of one step.

Workload: Census-Income (KDD), MMoE (8 experts of 64, towers of 32), a global batch of ``--batch``
(512; each of R ranks takes batch / R samples, so the runs train the same model on the same
batches). Methods,
one per family and level: ``ew`` (a loss weighting: DDP's own reducer), ``mgda_ub`` (MGDA at the
representation level: a K x K all-reduce), ``mgda`` (parameter level, exact: the K per-task
gradients averaged), ``mgda-local`` (parameter level, the local-Gramian approximation) and
``upgrad`` (parameter level, exact).

Each (method, ranks) cell runs in freshly spawned processes, one torch thread each, over
``--rounds`` interleaved rounds (1 rank, 2 ranks, ...); cell = median over rounds of the median
step time (``Trainer.train_step`` after ``--warmup`` steps). Speed-up = 1-rank time / 2-rank time
(the ideal is 2 on two cores). Bytes per step are counted on rank 0 at every ``torch.distributed``
collective that mtlkit issues (``all_reduce``/``all_gather``, patched to count); the loss
weightings' gradient is averaged by DDP's C++ reducer, which is not patched: its volume is the
model's parameter count x 4 bytes, added as such (column "DDP reducer").

usage: python benchmarks/ddp_scaling.py [--methods ew mgda_ub mgda mgda-local upgrad]
       [--batch 512] [--rounds 3] [--steps 40] [--warmup 5] [--out benchmarks/results/ddp_scaling.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtlkit as mk
from mtlkit.train.distributed import DistributedRun, finish, shard_loader

sys.path.insert(0, str(Path(__file__).parent))
from tables import write_results

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ew": ("ew", {}),
    "mgda_ub": ("mgda_ub", {}),
    "mgda": ("mgda", {}),
    "mgda-local": ("mgda", {"ddp_gramian": "local"}),
    "upgrad": ("upgrad", {}),
}


def _count_bytes(counter: list[int]) -> None:
    """Patch the collectives mtlkit calls so that rank 0 counts the bytes it sends into them."""
    for name in ("all_reduce", "all_gather"):
        original = getattr(dist, name)

        def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            tensor = args[0] if _name == "all_reduce" else args[1]
            counter[0] += tensor.numel() * tensor.element_size()
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _worker(
    rank: int, world: int, init: str, out: str, label: str, steps: int, warmup: int, batch_size: int
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    counter = [0]
    try:
        data = mk.data.load("census_income")
        torch.manual_seed(0)
        model = mk.models.MMoE(data.in_features, data.tasks, num_experts=8, expert_dims=[64], tower_dims=[32])
        name, options = METHODS[label]
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        trainer = mk.Trainer(
            wrapped,
            data.tasks,
            mk.methods.create(name, **options),
            torch.optim.SGD(model.parameters(), lr=0.01),
            device="cpu",
            progress=False,
        )
        batches = iter(shard_loader(data.train, batch_size, DistributedRun(rank, world, torch.device("cpu"))))
        for _ in range(warmup):
            trainer.train_step(next(batches))
        _count_bytes(counter)
        times = []
        for _ in range(steps):
            batch = next(batches)
            dist.barrier()  # every step starts together: the slowest rank sets the time
            tic = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - tic)
        if rank == 0:
            parameters = sum(p.numel() for p in model.parameters())
            torch.save(
                {"median": statistics.median(times), "bytes": counter[0] / steps, "d": parameters}, out
            )
    finally:
        finish()


def cell(label: str, world: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(
            _worker,
            args=(world, os.path.join(tmp, "init"), out, label, args.steps, args.warmup, args.batch),
            nprocs=world,
            join=True,
        )
        return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch", type=int, default=512, help="the global batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp_scaling.md"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict[str, dict[int, list[dict[str, float]]]] = {m: {1: [], 2: []} for m in args.methods}
    for _ in range(args.rounds):
        for label in args.methods:
            for world in (1, 2):
                results[label][world].append(cell(label, world, args))
    load_after = os.getloadavg()
    rows = []
    for label in args.methods:
        one = statistics.median(r["median"] for r in results[label][1])
        two = statistics.median(r["median"] for r in results[label][2])
        d = results[label][2][0]["d"]
        mtlkit_bytes = results[label][2][0]["bytes"]
        reducer = 4 * d if METHODS[label][0] == "ew" else 0
        rows.append(
            {
                "method": label,
                "one_rank_ms": one * 1e3,
                "two_ranks_ms": two * 1e3,
                "speedup": one / two,
                "mtlkit_bytes_per_step": mtlkit_bytes,
                "ddp_reducer_bytes_per_step": reducer,
                "parameters": d,
            }
        )
    lines = [
        "# Data-parallel scaling on one machine (CPU, gloo)",
        "",
        f"`{' '.join(['python', *sys.argv])}` (Census-Income, MMoE, global batch {args.batch}; "
        f"{args.rounds} interleaved rounds x {args.steps} timed steps; one thread per rank; torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs, {platform.machine()}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after). Bytes: what rank 0 puts into "
        "collectives per step (model: "
        f"{rows[0]['parameters']:,} parameters).",
        "",
        "| method | 1 rank ms/step | 2 ranks ms/step | speed-up | mtlkit collectives bytes/step | DDP reducer bytes/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['one_rank_ms']:.2f} | {r['two_ranks_ms']:.2f} | {r['speedup']:.2f} | "
            f"{r['mtlkit_bytes_per_step']:,.0f} | {r['ddp_reducer_bytes_per_step']:,.0f} |"
        )
    data = {
        "load_average": [load_before, load_after],
        "rows": rows,
        "args": {**vars(args), "out": str(args.out)},
    }
    write_results(args.out, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()
