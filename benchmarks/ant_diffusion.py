"""ANT on a CPU: diffusion training on Fashion-MNIST as multi-task learning over timestep intervals.

A DDPM (linear schedule, T = 1000) with mtlkit's small timestep U-Net (width 16, ~100k parameters)
is trained on ``--images`` Fashion-MNIST training images (28 x 28, scaled to [-1, 1]) with the
official ANT set-up where it fits a CPU: k = 5 uniform intervals (what the official scripts use),
a batch of 50 split into 5 stratified chunks of 10, and the per-interval methods of the paper:

- vanilla: the plain noise-prediction loss (EW over the 5 interval losses, equal chunks);
- ANT-UW: uncertainty weighting, log-variance learning rate 0.025 (official);
- ANT-PCGrad: PCGrad on the 5 interval gradients;
- ANT-Nash: Nash-MTL with weights refreshed every 25 steps and the shared gradient clipped at 1.

Departures, for a CPU budget: Adam with lr 1e-3 for ``--epochs`` epochs instead of AdamW 1e-4 for
800k iterations, no EMA, no FID (the model is far too small and short-trained); quality is the
held-out noise-prediction loss per interval, on ``--test`` test images with one fixed (t, noise)
draw per image and interval.

O1 (task affinity falls with the gap between noise levels): the gradient-cosine matrix between 12
timesteps on the trained vanilla model (256 test images), its Spearman correlation with the gap,
and a heat map. O2 (negative transfer): one specialist per interval, trained on that interval's
chunk only (the same samples and steps as the joint model, the other chunks' losses weighted 0),
against the vanilla model on that interval; an interval where the specialist is better shows
negative transfer from the other intervals.

usage: python benchmarks/ant_diffusion.py [--images 12000] [--test 2000] [--epochs 3]
                                          [--seeds 0 1] [--workers 2]
                                          [--out benchmarks/results/ant_diffusion.md]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from tables import mean_sd

#: label -> (registry name, options)
METHODS: dict[str, tuple[str, dict]] = {
    "vanilla": ("ew", {}),
    "ANT-UW": ("uw", {"lr": 0.025}),
    "ANT-PCGrad": ("pcgrad", {}),
    "ANT-Nash": ("nash_mtl", {"update_every": 25, "max_norm": 1.0}),
}
K = 5
BATCH = 50
AFFINITY_STEPS = [0, 25, 50, 100, 200, 300, 400, 500, 600, 700, 850, 999]


def _images(n: int, split: str, seed: int):
    import torch

    import mtlkit as mk

    images, _ = mk.data.load_fashion_mnist(split)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[pick].float().div(127.5).sub(1.0).unsqueeze(1)


def _evaluate(model, test, schedule, intervals) -> list[float]:
    """Held-out noise-prediction loss per interval (one fixed draw per image and interval)."""
    import torch

    gen = torch.Generator().manual_seed(12345)
    sums = [0.0] * K
    counts = [0] * K
    model.eval()
    with torch.no_grad():
        for x0 in test.split(BATCH):
            for j in range(K):  # every image at every interval
                lo, hi = intervals[j]
                t = torch.randint(lo, hi + 1, (len(x0),), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                eps = next(iter(model({"x": schedule.noisy(x0, t, noise), "t": t}).values()))
                sums[j] += float(torch.nn.functional.mse_loss(eps, noise, reduction="sum"))
                counts[j] += noise.numel()
    return [s / c for s, c in zip(sums, counts, strict=True)]


def _job(args: tuple) -> dict:
    kind, label, seed, cfg = args
    import torch

    torch.set_num_threads(1)
    import mtlkit as mk
    from mtlkit.core.intervals import uniform_intervals

    intervals = uniform_intervals(1000, K)
    schedule = mk.data.NoiseSchedule()
    train = _images(cfg["images"], "train", seed=100 + seed)
    test = _images(cfg["test"], "test", seed=7)
    batches = [b for b in train.split(BATCH) if len(b) == BATCH]
    loader = mk.data.DiffusionLoader(batches, intervals, schedule, seed=seed)
    torch.manual_seed(seed)
    model = mk.models.TimestepDenoiser(loader.tasks, width=16)
    if kind == "specialist":  # only this interval's chunk contributes
        weights = [1.0 if j == label else 0.0 for j in range(K)]
        method = mk.methods.create("agd", schedule="weighted", weights=weights)
    else:
        name, options = METHODS[label]
        method = mk.methods.create(name, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = mk.Trainer(model, loader.tasks, method, optimizer, device="cpu", progress=False, seed=seed)
    start = time.perf_counter()
    trainer.fit(loader, epochs=cfg["epochs"])
    seconds = time.perf_counter() - start
    out = {
        "kind": kind,
        "label": label,
        "seed": seed,
        "interval_loss": _evaluate(model, test, schedule, intervals),
        "train_seconds": seconds,
        "steps": trainer.step,
    }
    if kind == "method" and label == "vanilla" and seed == cfg["seeds"][0]:
        affinity = mk.relatedness.timestep_affinity(
            model, [test[:128], test[128:256]], schedule, AFFINITY_STEPS, seed=0
        )
        rho, gaps, means = mk.relatedness.affinity_decay(affinity, AFFINITY_STEPS)
        out["affinity"] = affinity.tolist()
        out["affinity_rho"] = rho
        out["gap_means"] = [[int(g), float(m)] for g, m in zip(gaps, means, strict=True)]
    return out


def report(data: dict) -> str:
    cfg = data["config"]
    runs = data["runs"]
    names = [f"[{lo}, {hi}]" for lo, hi in data["intervals"]]
    lines = [
        "# ANT: diffusion training as multi-task learning over timestep intervals (CPU scale)",
        "",
        f"Command: `{data['command']}`; {data['cpus']} CPUs, load average {data['load_before']} before, "
        f"{cfg['workers']} workers of one thread; wall {data['wall_seconds'] / 60:.1f} min.",
        "",
        f"Fashion-MNIST, {cfg['images']} training and {cfg['test']} test images, DDPM linear schedule "
        f"(T = 1000), k = {K} uniform intervals, batch {BATCH} (5 stratified chunks of 10), "
        f"`TimestepDenoiser(width=16)`, Adam 1e-3, {cfg['epochs']} epochs, seeds {cfg['seeds']}.",
        "",
        "## Held-out noise-prediction loss per interval (mean ± sd over seeds; lower is better)",
        "",
        "| method | " + " | ".join(names) + " | mean | train s |",
        "|---" * (len(names) + 3) + "|",
    ]
    for label in METHODS:
        rows = [r for r in runs if r["kind"] == "method" and r["label"] == label]
        cells = [mean_sd([r["interval_loss"][j] for r in rows], ".4f") for j in range(K)]
        means = [statistics.mean(r["interval_loss"]) for r in rows]
        secs = statistics.mean(r["train_seconds"] for r in rows)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean_sd(means, '.4f')} | {secs:.0f} |")
    lines += [
        "",
        "## O2: negative transfer (specialist per interval vs the joint vanilla model)",
        "",
        "A specialist trains on its interval's chunk only (the same samples and steps as the joint "
        f"model; seed {cfg['seeds'][0]}). Gap = joint - specialist on that interval (positive: the "
        "other intervals hurt this one).",
        "",
        "| interval | specialist | joint (same seed) | gap | gap % |",
        "|---|---|---|---|---|",
    ]
    joint = next(
        r for r in runs if r["kind"] == "method" and r["label"] == "vanilla" and r["seed"] == cfg["seeds"][0]
    )
    for j in range(K):
        spec = next(r for r in runs if r["kind"] == "specialist" and r["label"] == j)
        a, b = spec["interval_loss"][j], joint["interval_loss"][j]
        lines.append(f"| {names[j]} | {a:.4f} | {b:.4f} | {b - a:+.4f} | {100 * (b - a) / a:+.1f} |")
    aff = joint.get("affinity")
    if aff is not None:
        lines += [
            "",
            "## O1: task affinity between timesteps (vanilla model, 256 test images)",
            "",
            f"Spearman correlation between |t_i - t_j| and the gradient cosine over all pairs: "
            f"**{joint['affinity_rho']:+.3f}** (negative: affinity falls with the gap). Mean cosine by gap:",
            "",
            "| gap | "
            + " | ".join(str(g) for g, _ in joint["gap_means"][:: max(1, len(joint["gap_means"]) // 10)])
            + " |",
            "|---" * (1 + len(joint["gap_means"][:: max(1, len(joint["gap_means"]) // 10)])) + "|",
            "| mean cosine | "
            + " | ".join(f"{m:.3f}" for _, m in joint["gap_means"][:: max(1, len(joint["gap_means"]) // 10)])
            + " |",
            "",
            f"![affinity]({Path(data['plot']).name})",
        ]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    joint = next(r for r in data["runs"] if r.get("affinity") is not None)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    im = a1.imshow(np.array(joint["affinity"]), cmap="viridis", vmin=-1, vmax=1)
    a1.set_xticks(range(len(AFFINITY_STEPS)), AFFINITY_STEPS, rotation=90)
    a1.set_yticks(range(len(AFFINITY_STEPS)), AFFINITY_STEPS)
    a1.set_title("gradient cosine between timesteps")
    fig.colorbar(im, ax=a1)
    gaps = [g for g, _ in joint["gap_means"]]
    a2.plot(gaps, [m for _, m in joint["gap_means"]], marker="o")
    a2.set_xlabel("|t_i - t_j|")
    a2.set_ylabel("mean gradient cosine")
    a2.set_title(f"O1: Spearman {joint['affinity_rho']:+.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ant_diffusion.md"))
    args = parser.parse_args()
    cfg = {
        "images": args.images,
        "test": args.test,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "workers": args.workers,
    }
    jobs = [("method", label, seed, cfg) for seed in args.seeds for label in METHODS]
    jobs += [("specialist", j, args.seeds[0], cfg) for j in range(K)]
    jobs.sort(key=lambda j: 0 if j[1] in ("ANT-PCGrad",) else 1)  # the longest first
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        runs = pool.map(_job, jobs, chunksize=1)
    from mtlkit.core.intervals import uniform_intervals

    data = {
        "command": "python " + " ".join(sys.argv),
        "cpus": os.cpu_count(),
        "load_before": round(load, 2),
        "wall_seconds": time.perf_counter() - start,
        "config": cfg,
        "intervals": uniform_intervals(1000, K),
        "runs": runs,
        "plot": str(args.out.with_suffix(".png")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    plot(data, args.out.with_suffix(".png"))
    args.out.write_text(report(data))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
