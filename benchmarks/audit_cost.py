"""What the robustness audits cost: each transfer attack's time and peak memory per image batch on
a track's expert (the surrogate the audit attacks), and each robust aggregation's merge time and
peak memory beside plain Task Arithmetic on the same task vectors.

    python benchmarks/audit_cost.py --tracks mlp8 efficientnet_lite0 --out benchmarks/results/audit_cost.md

One thread, the glibc mmap threshold fixed (freed tensors leave the process, so each call starts
from the same floor), rounds interleaved: every attack (and every merge) runs once per round, in
order, for ``--rounds`` rounds, after one unmeasured warm-up round. *gradients / image*: the input
gradients the attack takes (VMI's variance samples included). Peak memory is the resident peak above
the start of the call (the kernel's VmHWM, reset before each call): the images, the graph of one
batch and the attack's buffers; the model is loaded before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from peak_memory import fix_mmap_threshold, measured

fix_mmap_threshold()

import torch  # noqa: E402

from merging_corruption import MERGES  # noqa: E402  (the corruption benchmark's merges)
from mtlkit.bench.merging_track import efficientnet_lite0_track, mlp8_track  # noqa: E402
from mtlkit.merging import merge  # noqa: E402
from mtlkit.merging.attacks import attack  # noqa: E402

#: input gradients per image of each attack at its defaults (10 iterations; VMI adds 20 samples each)
GRADIENTS = {"fgsm": 1, "pgd": 10, "mi_fgsm": 10, "di_fgsm": 10, "ti_fgsm": 10, "vmi_fgsm": 210}


def track_cost(name: str, images: int, rounds: int, eps: float) -> dict[str, Any]:
    track = mlp8_track(0) if name == "mlp8" else efficientnet_lite0_track(0)
    task = next(iter(track.tasks))
    split = track.tasks[task].test
    x, y = split.images[:images], split.labels[:images]
    expert, head = track.backbone(track.experts[task]), track.heads[task]

    def surrogate(batch: torch.Tensor) -> torch.Tensor:
        return head(expert(batch))

    pretrained, experts = track.pretrained, track.experts
    attacks: dict[str, dict[str, list[float]]] = {a: {"seconds": [], "mib": []} for a in GRADIENTS}
    merges: dict[str, dict[str, list[float]]] = {label: {"seconds": [], "mib": []} for label, _, _ in MERGES}
    for r in range(rounds + 1):
        for a in GRADIENTS:
            _, seconds, mib = measured(lambda a=a, r=r: attack(a, surrogate, x, y, eps, seed=r))
            if r:
                attacks[a]["seconds"].append(seconds)
                attacks[a]["mib"].append(mib)
        for label, method, options in MERGES:
            _, seconds, mib = measured(lambda m=method, o=options: merge(pretrained, experts, m, **o))
            if r:
                merges[label]["seconds"].append(seconds)
                merges[label]["mib"].append(mib)
    parameters = sum(t.numel() for t in pretrained.values())
    return {
        "task": task,
        "images": images,
        "image_shape": list(x.shape[1:]),
        "parameters": parameters,
        "experts": len(experts),
        "attacks": attacks,
        "merges": merges,
    }


def cell(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(results: dict[str, dict[str, Any]], command: str, rounds: int, eps: float) -> str:
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        "# What the robustness audits cost",
        "",
        f"`{command}` · torch {torch.__version__}, {platform.machine()}, one thread, "
        f"MALLOC_MMAP_THRESHOLD_ fixed, {rounds} interleaved rounds after a warm-up, budget "
        f"{eps * 255:.0f}/255, load average at the end {load}.",
        "",
        "Median (range) over rounds. Attacks run on the first task's expert with its head, the audit's "
        "white-box surrogate; *ms / image* is the batch's time over its size. Merges take the eight "
        "task vectors of the track's backbone; the robust merges are `robust_ta` at its defaults.",
    ]
    for name, res in results.items():
        lines += [
            "",
            f"## {name}: {res['parameters']:,} backbone parameters, {res['experts']} experts, "
            f"a batch of {res['images']} images of shape {tuple(res['image_shape'])}; merges of the backbone",
            "",
            "| attack | gradients / image | ms / image | batch s | peak MiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for a, m in res["attacks"].items():
            per_image = [1000 * s / res["images"] for s in m["seconds"]]
            lines.append(
                f"| {a} | {GRADIENTS[a]} | {cell(per_image, '.2f')} | {cell(m['seconds'], '.3f')} | "
                f"{cell(m['mib'], '.1f')} |"
            )
        base = statistics.median(res["merges"]["Task Arithmetic"]["seconds"])
        lines += ["", "| merge | s | / Task Arithmetic | peak MiB |", "|---|---:|---:|---:|"]
        for label, m in res["merges"].items():
            ratio = statistics.median(m["seconds"]) / base
            lines.append(f"| {label} | {cell(m['seconds'], '.3f')} | {ratio:.1f} | {cell(m['mib'], '.0f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracks", nargs="+", default=["mlp8"], choices=["mlp8", "efficientnet_lite0"])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--out", default="benchmarks/results/audit_cost.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {t: track_cost(t, args.images, args.rounds, args.eps) for t in args.tracks}
    command = "python benchmarks/audit_cost.py --tracks " + " ".join(args.tracks)
    out = Path(args.out)
    out.write_text(report(results, command, args.rounds, args.eps))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
