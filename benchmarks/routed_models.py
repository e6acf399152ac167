"""The routed and modular models' distinguishing experiments over several seeds: Learning to Route,
the dual encoder and ADH-MTL, on their synthetic test beds (``mk.data.routing_synthetic``, planted
factor spaces, ``mk.data.adh_cohort``).

- **Learning to Route** (4,000 training and 2,000 held-out samples, hidden 32, Adam 3e-3, batch 128,
  30 epochs): the share of held-out samples whose heavier raw path is the informative modality
  (spec: > 80%); held-out MSE of the routed model and of the same model pinned to each fixed path;
  the mean "shared" (tied-head) mass of the identical-target subgroup minus the other samples'.
- **Dual encoder**: (a) the largest principal angle between the learned shared encoder and a
  planted 2-d shared factor space (5 tasks of 3 outputs, 10 features, Adam 1e-2, 120 epochs;
  spec: < 15 degrees); (b) the share of a lambda grid (0.02 to 0.3) at which the fused coefficient
  step finds exactly the two planted task clusters.
- **ADH-MTL** (300 patients, 20% held out as new patients, linear extractor, Adam 0.05, 15
  epochs): held-out cross-entropy of 3 group models against one global model (mean over the four
  diseases), and, with the last disease assessed for 1% of the patients, its held-out cross-entropy
  without and with the dependency prior (lambda_d 0.03), scored on every held-out label.

usage: python benchmarks/routed_models.py [--seeds 0 1 2 3 4] [--out benchmarks/results/routed_models.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mtlkit as mk
from mtlkit.models.fused_coefficients import solve_fused_coefficients

sys.path.insert(0, str(Path(__file__).parent))
from tables import mean_sd, write_results


# -- Learning to Route --------------------------------------------------------------------------------
def _route_model(bed: Any, seed: int, path: int | None = None) -> mk.models.LearningToRoute:
    torch.manual_seed(seed)
    model = mk.models.LearningToRoute(24, bed.tasks, modality_dims=list(bed.modality_dims), hidden=32)
    if path is not None:
        model.pin_path(path)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    trainer = mk.Trainer(model, bed.tasks, "ew", optimizer, device="cpu", progress=False, seed=seed)
    trainer.fit(mk.data.loader(bed.data, 128, shuffle=True), epochs=30)
    return model.eval()


def _route_mse(model: mk.models.LearningToRoute, bed: Any) -> float:
    with torch.no_grad():
        out = model(bed.data.inputs)
    return statistics.mean(
        float((out[t].squeeze(1) - bed.data.targets[t]).pow(2).mean()) for t in ("y1", "y2")
    )


def learning_to_route(seed: int) -> dict[str, float]:
    train, held = (
        mk.data.routing_synthetic(4000, seed=2 * seed),
        mk.data.routing_synthetic(2000, seed=2 * seed + 1),
    )
    routed = _route_model(train, seed)
    with torch.no_grad():
        routed(held.data.inputs)
    mass = routed.last_routing.view(-1, 3, 2).sum(2)
    out = {"agreement": float(((mass[:, 0] > mass[:, 1]) == held.informative_first).float().mean())}
    out["routed_mse"] = _route_mse(routed, held)
    for path, name in enumerate(("modality 0", "modality 1", "fused")):
        out[f"{name} mse"] = _route_mse(_route_model(train, seed, path), held)
    groups = mk.data.routing_synthetic(4000, seed=100 + seed, shared_groups=True)
    held_groups = mk.data.routing_synthetic(2000, seed=200 + seed, shared_groups=True)
    model = _route_model(groups, seed)
    with torch.no_grad():
        model(held_groups.data.inputs)
    tied = model.last_routing.view(-1, 3, 2).sum(1)[:, 0]
    same = held_groups.same_targets
    out["tied_mass_gap"] = float(tied[same].mean() - tied[~same].mean())
    return out


# -- dual encoder -------------------------------------------------------------------------------------
def dual_encoder(seed: int) -> dict[str, float]:
    data, tasks, a_s = mk.data.planted_factor_tasks(seed)
    torch.manual_seed(seed)
    model = mk.models.DualEncoder(10, tasks, out_features=3, shared_dim=2, task_dim=1)
    trainer = mk.Trainer(
        model, tasks, "ew", torch.optim.Adam(model.parameters(), lr=1e-2), device="cpu", progress=False
    )
    trainer.fit(mk.data.loader(data, 200, shuffle=True), epochs=120)
    angle = model.shared_angle(a_s)
    factors, ys = mk.data.clustered_coefficients(seed)
    grid = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3]
    hits = [
        solve_fused_coefficients(factors, ys, 3, lam, 0.01).clusters == [[0, 1, 2], [3, 4, 5]] for lam in grid
    ]
    return {"subspace_angle": angle, "two_cluster_share": sum(hits) / len(grid)}


# -- ADH-MTL ----------------------------------------------------------------------------------------------
def _adh(cohort: Any, groups: int, seed: int, **options: Any) -> mk.models.ADHMTL:
    torch.manual_seed(seed)
    width = cohort.data.inputs.shape[1]
    model = mk.models.ADHMTL(
        width, cohort.tasks, summary_dim=cohort.summary_dim, num_groups=groups, hidden_dims=(), **options
    )
    if groups > 1:
        model.fit_groups(cohort.summaries(cohort.train_patients))
    trainer = mk.Trainer(
        model, cohort.tasks, "ew", torch.optim.Adam(model.parameters(), lr=0.05), device="cpu", progress=False
    )
    trainer.fit(mk.data.loader(cohort.rows(cohort.train_patients), 256, shuffle=True), epochs=15)
    return model.eval()


def _bce(model: mk.models.ADHMTL, data: Any, task: str) -> float:
    with torch.no_grad():
        logits = model(data.inputs, task=task)[task].squeeze(1)
    y = data.targets[task]
    keep = ~torch.isnan(y)
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], y[keep]))


def adh_mtl(seed: int) -> dict[str, float]:
    cohort = mk.data.adh_cohort(patients=300, seed=seed)
    held = cohort.rows(cohort.test_patients)
    grouped, single = _adh(cohort, 3, seed), _adh(cohort, 1, seed)
    out = {
        "group_bce": statistics.mean(_bce(grouped, held, t) for t in cohort.tasks.names),
        "global_bce": statistics.mean(_bce(single, held, t) for t in cohort.tasks.names),
    }
    scarce = mk.data.adh_cohort(patients=300, scarce=0.01, seed=seed + 1)
    full = mk.data.adh_cohort(patients=300, assessed=1.0, seed=seed + 1)
    held_full = full.rows(full.test_patients)
    deps = torch.zeros(4, 4)
    deps[3, 0] = deps[3, 1] = 0.5
    out["scarce_without_prior"] = _bce(_adh(scarce, 3, seed, lambda_d=0.03), held_full, "disease3")
    out["scarce_with_prior"] = _bce(
        _adh(scarce, 3, seed, lambda_d=0.03, dependencies=deps), held_full, "disease3"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/routed_models.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = {
        "route": [learning_to_route(s) for s in args.seeds],
        "dual": [dual_encoder(s) for s in args.seeds],
        "adh": [adh_mtl(s) for s in args.seeds],
    }

    angles = ", ".join(f"{r['subspace_angle']:.2f}" for r in runs["dual"])
    prior_change = [r["scarce_with_prior"] - r["scarce_without_prior"] for r in runs["adh"]]

    def cell(part: str, key: str, fmt: str = ".4f") -> str:
        return mean_sd([r[key] for r in runs[part]], fmt)

    lines = [
        "# Routed and modular models: their distinguishing experiments",
        "",
        f"`{' '.join(['python', *sys.argv])}` (seeds {args.seeds}, mean ± sd; {time.perf_counter() - start:.0f} s; "
        "settings in the script's docstring).",
        "",
        "## Learning to Route",
        "",
        "| routing agreement with the informative modality | routed MSE | modality 0 only | modality 1 only | fused only | tied-mass gap of the identical-target subgroup |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {cell('route', 'agreement')} | {cell('route', 'routed_mse')} | {cell('route', 'modality 0 mse')} | "
        f"{cell('route', 'modality 1 mse')} | {cell('route', 'fused mse')} | {cell('route', 'tied_mass_gap')} |",
        "",
        "## Dual encoder",
        "",
        "| largest angle to the planted shared space (degrees) | per seed | share of the lambda grid with exactly the two clusters |",
        "|---:|---:|---:|",
        f"| {cell('dual', 'subspace_angle', '.3f')} | {angles} | "
        f"{cell('dual', 'two_cluster_share', '.2f')} |",
        "",
        "## ADH-MTL (new patients)",
        "",
        "| 3 group models, mean BCE | one global model, mean BCE | scarce disease without the prior | with the dependency prior | "
        "paired change from the prior (seeds where it helps) |",
        "|---:|---:|---:|---:|---:|",
        f"| {cell('adh', 'group_bce')} | {cell('adh', 'global_bce')} | {cell('adh', 'scarce_without_prior')} | "
        f"{cell('adh', 'scarce_with_prior')} | {mean_sd(prior_change, '+.4f')} "
        f"({sum(c < 0 for c in prior_change)}/{len(prior_change)}) |",
    ]
    write_results(args.out, "\n".join(lines) + "\n", {"seeds": args.seeds, "runs": runs})


if __name__ == "__main__":
    main()
