"""M3ViT at a CPU size: inference cost of one task against the dense alternatives, and training on
Multi-Fashion against a dense ViT of the same size and MultiLeNet.

Model: Multi-Fashion's images, 1 x 28 x 28, patch 7 (16 tokens + the class token), dim 64, depth 4 (blocks 1 and 3
routed), 4 heads, dense MLP ratio 2; experts: 16, top-4, expert width 64 (``moe_mlp_ratio`` 1),
multi-gate routers, noise 0, balancing weight 0.01 (the official defaults).

**Inference** (batch 64, one thread, ``torch.utils.flop_counter`` FLOPs and the median of
``--repeats`` interleaved timings):

- ``M3ViT, one task``: ``model(x, task=t)``: one pass, k = 4 of 16 experts per token;
- ``M3ViT, every task``: ``model(x)``: one pass per task (2);
- ``M3ViT, all experts``: one pass running all 16 experts on every token (the dense mixture);
- ``dense ViT (same parameters)``: the MoE MLPs replaced by one MLP as wide as the 16 experts
  together (1,024), one pass shared by both tasks: an encoder-shared multi-task ViT of the same
  size -- the kind of baseline of the paper's 88% FLOP reduction (which compares against
  encoder-focused MTL models with heavy decoders on dense prediction, not reproduced here).

**Training** (Multi-Fashion, ``--train`` images, ``--epochs`` epochs, Adam lr 1e-3, batch 128, EW,
``--seeds`` seeds; test accuracy of both tasks): M3ViT, the dense ViT of the same size
(``num_experts=1, top_k=1, moe_mlp_ratio=16``: one expert, gate value 1; like M3ViT it runs one
backbone pass per task, so its seconds count two passes per batch), and MultiLeNet.

usage: python benchmarks/m3vit.py [--repeats 30] [--train 20000] [--epochs 3] [--seeds 0 1]
       [--out benchmarks/results/m3vit.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import mtlkit as mk

sys.path.insert(0, str(Path(__file__).parent))
from tables import mean_sd, write_results

SHAPE = (1, 28, 28)
SIZE = {"dim": 64, "depth": 4, "heads": 4, "patch_size": 7, "mlp_ratio": 2.0}


def m3vit(tasks: Any) -> mk.models.M3ViT:
    return mk.models.M3ViT(SHAPE, tasks, out_features=10, num_experts=16, top_k=4, **SIZE)


def dense_vit(tasks: Any) -> mk.models.M3ViT:
    return mk.models.M3ViT(SHAPE, tasks, out_features=10, num_experts=1, top_k=1, moe_mlp_ratio=16.0, **SIZE)


def flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def inference(tasks: Any, repeats: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model, dense = m3vit(tasks).eval(), dense_vit(tasks).eval()
    x = torch.randn(64, *SHAPE)
    t = tasks.names[0]

    def shared_pass() -> None:
        z, _ = dense.encode(dense.tokens(x), t)
        for name in tasks.names:
            dense.heads[name](z)

    cases: dict[str, Callable[[], Any]] = {
        "M3ViT, one task": lambda: model(x, task=t),
        "M3ViT, every task": lambda: model(x),
        "M3ViT, all experts (dense mixture)": lambda: model.heads[t](
            model.encode(model.tokens(x), t, dense=True)[0]
        ),
        "dense ViT, same parameters, every task": shared_pass,
    }
    counts = {name: flops(fn) for name, fn in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in cases.items():
                tic = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - tic)
    base = counts["dense ViT, same parameters, every task"]
    params = {
        "M3ViT": sum(p.numel() for p in model.parameters()),
        "dense ViT": sum(p.numel() for p in dense.parameters()),
    }
    return [
        {
            "case": name,
            "gflops": counts[name] / 1e9,
            "flops_vs_dense_vit": counts[name] / base,
            "ms": statistics.median(times[name]) * 1e3,
            "parameters": params["dense ViT" if name.startswith("dense") else "M3ViT"],
        }
        for name in cases
    ]


def train(name: str, data: Any, seed: int, epochs: int, n_train: int) -> dict[str, float]:
    torch.manual_seed(seed)
    if name == "M3ViT":
        model: torch.nn.Module = m3vit(data.tasks)
    elif name == "dense ViT":
        model = dense_vit(data.tasks)
    else:
        model = mk.models.MultiLeNet(SHAPE, data.tasks, out_features=10)
    train_set = mk.data.seeded_subset(data, n_train, seed).train
    loader = mk.data.loader(train_set, 128, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = mk.Trainer(
        model,
        data.tasks,
        "ew",
        torch.optim.Adam(model.parameters(), lr=1e-3),
        device="cpu",
        progress=False,
        seed=seed,
    )
    start = time.perf_counter()
    trainer.fit(loader, epochs=epochs)
    seconds = time.perf_counter() - start
    report = trainer.evaluate(mk.data.loader(data.test, 1000))
    out = {f"{t}/accuracy": report.metrics[t]["accuracy"] for t in data.tasks.names}
    out["seconds"] = seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/m3vit.md"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("MTLKIT_THREADS", "1")))
    data = mk.data.load("multi_fashion")
    load = os.getloadavg()
    rows = inference(data.tasks, args.repeats)
    runs = {
        m: [train(m, data, s, args.epochs, args.train) for s in args.seeds]
        for m in ("M3ViT", "dense ViT", "MultiLeNet")
    }
    names = data.tasks.names
    lines = [
        "# M3ViT at a CPU size: single-task inference cost and Multi-Fashion training",
        "",
        f"`{' '.join(['python', *sys.argv])}` (torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.machine()}, load average {load[0]:.2f} at the start). Settings in the script's docstring.",
        "",
        "## Inference, batch 64",
        "",
        "| case | parameters | GFLOPs | FLOPs vs the dense ViT | CPU ms (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['parameters']:,} | {r['gflops']:.3f} | {r['flops_vs_dense_vit']:.3f} | {r['ms']:.2f} |"
        )
    lines += [
        "",
        f"## Multi-Fashion, {args.train:,} training images, {args.epochs} epochs, EW (seeds {args.seeds})",
        "",
        f"| model | {names[0]} accuracy | {names[1]} accuracy | seconds per run |",
        "|---|---:|---:|---:|",
    ]
    for model_name, model_runs in runs.items():
        lines.append(
            f"| {model_name} | {mean_sd([r[f'{names[0]}/accuracy'] for r in model_runs])} | "
            f"{mean_sd([r[f'{names[1]}/accuracy'] for r in model_runs])} | "
            f"{statistics.mean(r['seconds'] for r in model_runs):.0f} |"
        )
    lines += [
        "",
        "The training-time dense ViT is an M3ViT with one expert, so like M3ViT it runs one backbone pass per task: its seconds count two passes per batch (an encoder-shared model would run one).",
    ]
    write_results(
        args.out,
        "\n".join(lines) + "\n",
        {"inference": rows, "training": runs, "args": {**vars(args), "out": str(args.out)}},
    )


if __name__ == "__main__":
    main()
