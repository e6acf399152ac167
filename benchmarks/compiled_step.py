"""Compiled multi-task steps: ``Trainer(compile=True)`` (the model's parts and the loss computation
under ``torch.compile``) against the eager step, for a loss weighting and Gramian methods at both
levels, on real data.

Workloads (each a real dataset's batches, fed identically to both models):

- ``census``: Census-Income (KDD) features, MMoE (8 experts of 64, towers of 32), batch 256;
- ``multi_fashion``: Multi-Fashion images (36 x 36), MultiLeNet, batch 256.

For each workload and method, an eager and a compiled Trainer start from the same weights and take
the same batches; the compiled one warms up (compilation) on ``--warmup`` batches that the eager
one also takes. Then ``--rounds`` interleaved rounds of ``--steps`` steps each (eager, compiled, in
turn) are timed with ``time.perf_counter`` around ``trainer.train_step``. Cell = median step time
over all timed steps; speed-up = eager median / compiled median. The last column is the largest
weight difference between the two models after all steps (the compiled step computes the same
update). One torch thread (``MTLKIT_THREADS``); the load average is recorded.

usage: python benchmarks/compiled_step.py [--workloads census multi_fashion] [--methods ew mgda
       mgda_ub upgrad] [--rounds 5] [--steps 20] [--warmup 5] [--out benchmarks/results/compiled_step.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import mtlkit as mk

sys.path.insert(0, str(Path(__file__).parent))
from tables import write_results


def workload(name: str) -> tuple[Any, torch.nn.Module, list[Any]]:
    """(tasks, model, batches) for a workload."""
    torch.manual_seed(0)
    if name == "census":
        data = mk.data.load("census_income")
        model = mk.models.MMoE(data.in_features, data.tasks, num_experts=8, expert_dims=[64], tower_dims=[32])
    elif name == "multi_fashion":
        data = mk.data.load("multi_fashion")
        model = mk.models.MultiLeNet(data.in_features, data.tasks)
    else:
        raise SystemExit(f"unknown workload {name!r}")
    loader = mk.data.loader(data.train, 256, shuffle=True, generator=torch.Generator().manual_seed(0))
    return data.tasks, model, list(_take(iter(loader), 400))


def _take(it: Iterator[Any], n: int) -> Iterator[Any]:
    for _ in range(n):
        yield next(it)


def trainer(tasks: Any, model: torch.nn.Module, method: str, compiled: bool) -> mk.Trainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return mk.Trainer(model, tasks, method, optimizer, device="cpu", progress=False, compile=compiled)


def measure(name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    tasks, model, batches = workload(name)
    eager = trainer(tasks, copy.deepcopy(model), method, False)
    comp = trainer(tasks, copy.deepcopy(model), method, True)
    need = args.warmup + args.rounds * args.steps
    if need > len(batches):
        raise SystemExit(f"{need} steps need more than the {len(batches)} batches prepared")
    start = time.perf_counter()
    for batch in batches[: args.warmup]:
        eager.train_step(batch)
        comp.train_step(batch)
    warmup_seconds = time.perf_counter() - start
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    cursor = args.warmup
    for _ in range(args.rounds):
        chunk = batches[cursor : cursor + args.steps]
        cursor += args.steps
        for label, t in (("eager", eager), ("compiled", comp)):
            for batch in chunk:
                tic = time.perf_counter()
                t.train_step(batch)
                times[label].append(time.perf_counter() - tic)
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(eager.model.state_dict().values(), comp.model.state_dict().values(), strict=True)
    )
    eager_ms, comp_ms = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
    return {
        "workload": name,
        "method": method,
        "eager_ms": eager_ms,
        "compiled_ms": comp_ms,
        "speedup": eager_ms / comp_ms,
        "warmup_s": warmup_seconds,
        "max_weight_difference": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", nargs="+", default=["census", "multi_fashion"])
    parser.add_argument("--methods", nargs="+", default=["ew", "mgda", "mgda_ub", "upgrad"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compiled_step.md"))
    args = parser.parse_args()
    threads = int(os.environ.get("MTLKIT_THREADS", "1"))
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    rows = [measure(w, m, args) for w in args.workloads for m in args.methods]
    load_after = os.getloadavg()
    lines = [
        "# Compiled steps: Trainer(compile=True) against eager, CPU",
        "",
        f"`python benchmarks/compiled_step.py` ({args.rounds} interleaved rounds x {args.steps} steps, "
        f"{args.warmup} warm-up steps; torch {torch.__version__}, {threads} thread(s), {platform.machine()}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after).",
        "",
        "| workload | method | eager ms/step | compiled ms/step | speed-up | warm-up s (both) | max weight diff |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
            f"{r['speedup']:.2f} | {r['warmup_s']:.1f} | {r['max_weight_difference']:.1e} |"
        )
    data = {
        "threads": threads,
        "load_average": [load_before, load_after],
        "rows": rows,
        "args": {**vars(args), "out": str(args.out)},
    }
    write_results(args.out, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()
