"""The MMoE paper's synthetic study: the gap between Shared-Bottom and MMoE as the task correlation
p falls from 1 to 0 (Ma et al., KDD 2018, §4.3; spec test A3), at the paper's model sizes and with
the shared part made too narrow for two tasks.

Data: :func:`mtlkit.data.mmoe_synthetic` (two regression tasks whose weight vectors have cosine
exactly p; the Pearson correlation of the two labels is reported per p). Each configuration pairs
a Shared-Bottom with an MMoE:

- ``paper``: the paper's setup, MMoE with 8 single-layer experts of 16 units, Shared-Bottom with
  one bottom layer of 113 units (the same parameter budget), towers of 8;
- ``narrow``: one unit in the bottom, and 8 experts of one unit each;
- ``narrow-sb8``: the Shared-Bottom given 8 units (as many hidden units as that MMoE's experts).

Every model is trained with EW (the summed MSE), Adam 1e-3, batch 128, for ``--epochs`` epochs.
Reported, mean ± sd over seeds (gaps paired per seed, SB - MMoE: positive means MMoE is better):
the training loss of the last epoch (the paper's figure plots training loss) and the test MSE of
the epoch with the lowest validation loss (both mean over the two tasks).

usage: python benchmarks/mmoe_synthetic_gap.py [--epochs 30] [--seeds 0 1 2 3 4] [--workers 2]
                                               [--out benchmarks/results/mmoe_synthetic_gap.md]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

from tables import mean_sd

CORRELATIONS = [1.0, 0.9, 0.7, 0.5, 0.0]
#: configuration -> {model label: (registry name, options)}
CONFIGS: dict[str, dict[str, tuple[str, dict]]] = {
    "paper": {
        "SharedBottom": ("shared_bottom", {"bottom_dims": [113], "tower_dims": [8]}),
        "MMoE": ("mmoe", {"num_experts": 8, "expert_dims": [16], "tower_dims": [8]}),
    },
    "narrow": {
        "SharedBottom": ("shared_bottom", {"bottom_dims": [1], "tower_dims": [8]}),
        "MMoE": ("mmoe", {"num_experts": 8, "expert_dims": [1], "tower_dims": [8]}),
    },
    "narrow-sb8": {
        "SharedBottom": ("shared_bottom", {"bottom_dims": [8], "tower_dims": [8]}),
        "MMoE": ("mmoe", {"num_experts": 8, "expert_dims": [1], "tower_dims": [8]}),
    },
}


def _job(args: tuple) -> dict:
    config, label, p, seed, epochs, n_train = args
    import torch

    torch.set_num_threads(1)
    import mtlkit as mk

    data = mk.data.load_mmoe_synthetic(n_train=n_train, n_val=1000, n_test=1000, correlation=p, seed=seed)
    torch.manual_seed(seed)
    name, options = CONFIGS[config][label]
    model = mk.models.create(name, in_features=data.in_features, tasks=data.tasks, **options)
    stopper = mk.train.EarlyStopping("loss", patience=epochs, restore_best=True)
    trainer = mk.Trainer(
        model,
        data.tasks,
        "ew",
        torch.optim.Adam(model.parameters(), lr=1e-3),
        device="cpu",
        early_stopping=stopper,
        progress=False,
        seed=seed,
    )
    start = time.perf_counter()
    history = trainer.fit(
        mk.data.loader(data.train, 128, shuffle=True), mk.data.loader(data.val, 1000), epochs=epochs
    )
    seconds = time.perf_counter() - start
    test = trainer.evaluate(mk.data.loader(data.test, 1000))  # the best validation epoch's weights
    names = data.tasks.names
    corr = float(torch.corrcoef(torch.stack([data.train.targets[t] for t in names]))[0, 1])
    return {
        "config": config,
        "model": label,
        "p": p,
        "seed": seed,
        "label_corr": corr,
        "train_loss": [statistics.mean(float(r[f"train/{t}/loss"]) for t in names) for r in history],
        "test_mse": statistics.mean(test.metrics[t]["mse"] for t in names),
        "best_epoch": stopper.best_epoch,
        "seconds": seconds,
        "params": sum(q.numel() for q in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--correlations", type=float, nargs="+", default=CORRELATIONS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None)
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        results, wall, load = saved["results"], saved["wall_s"], saved["load"]
    else:
        jobs = [
            (c, m, p, s, args.epochs, args.n_train)
            for c in args.configs
            for p in args.correlations
            for s in args.seeds
            for m in CONFIGS[c]
        ]
        start = time.perf_counter()
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(_job, jobs, chunksize=1)
        wall, load = time.perf_counter() - start, os.getloadavg()
    text = report(results, args, wall, load)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        payload = {"results": results, "wall_s": wall, "load": load}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))


def report(results: list[dict], args, wall: float, load) -> str:
    by = {(r["config"], r["model"], r["p"], r["seed"]): r for r in results}
    out = [
        "# MMoE vs Shared-Bottom as the task correlation falls",
        "",
        f"MMoE synthetic data (dim 100, 10 sines, noise 0.1, c = 1; {args.n_train} training, 1000 "
        f"validation and 1000 test points per seed), seeds {args.seeds}; EW, Adam 1e-3, batch 128, "
        f"{args.epochs} epochs. Train loss: the last epoch's; test MSE: the epoch with the lowest "
        "validation loss; both averaged over the two tasks; mean ± sd over seeds; gaps SB - MMoE "
        f"paired per seed (positive: MMoE better). {args.workers} workers of one thread, "
        f"{wall / 60:.1f} min, load average at the end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}.",
        "",
    ]
    for config in args.configs:
        params = {
            m: next(r["params"] for r in results if r["config"] == config and r["model"] == m)
            for m in CONFIGS[config]
        }
        sizes = "; ".join(f"{m} {CONFIGS[config][m][1]} ({params[m]:,} parameters)" for m in CONFIGS[config])
        out += [
            f"## `{config}`: {sizes}",
            "",
            "| p | label corr. | SB train loss | MMoE train loss | gap (train) | SB test MSE | MMoE test MSE | gap (test) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in args.correlations:
            sb = [by[(config, "SharedBottom", p, s)] for s in args.seeds]
            mo = [by[(config, "MMoE", p, s)] for s in args.seeds]
            gap_train = [a["train_loss"][-1] - b["train_loss"][-1] for a, b in zip(sb, mo, strict=True)]
            gap_test = [a["test_mse"] - b["test_mse"] for a, b in zip(sb, mo, strict=True)]
            out.append(
                f"| {p:.1f} | {mean_sd([r['label_corr'] for r in sb], '.2f')} | "
                f"{mean_sd([r['train_loss'][-1] for r in sb])} | {mean_sd([r['train_loss'][-1] for r in mo])} | "
                f"{mean_sd(gap_train, '+.4f')} | {mean_sd([r['test_mse'] for r in sb])} | "
                f"{mean_sd([r['test_mse'] for r in mo])} | {mean_sd(gap_test, '+.4f')} |"
            )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
