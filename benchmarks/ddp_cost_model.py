"""On paper, not measured: the communication time per step of each method family under DDP at 8 to
64 GPUs, for K = 10 and K = 100 tasks, from the volumes mtlkit sends (``docs/distributed.md``) and
the textbook alpha-beta model of NCCL's collectives.

Volumes per rank and step (d = shared parameters, h = task-specific parameters, float32 gradients,
float64 Gramians and losses):

- loss weighting: the gradient, ``4 (d + h)`` bytes (DDP's reducer), plus ``16 K`` (global losses);
- Gramian, representation level: ``4 (d + h) + 8 K^2 + 16 K``;
- Gramian or Jacobian, parameter level, exact: ``4 K d`` (the per-task gradients) ``+ 4 h + 16 K``;
- Gramian, parameter level, local approximation: ``4 (d + h) + 8 K^2 + 16 K``.

Time of one all-reduce of ``n`` bytes on ``R`` ranks: ring, ``2 (R - 1) alpha + 2 (R - 1) / R * n /
beta``, for messages over 1 MiB; tree, ``2 log2(R) alpha + 2 n / beta`` below. Assumed hardware
(edit the constants): one node of 8 GPUs on NVLink (beta = 300 GB/s per GPU, alpha = 10 us); more
than 8 GPUs: nodes joined by 400 Gb/s InfiniBand per GPU (beta = 50 GB/s, alpha = 20 us), the
slowest link bounding the ring. Model: d = 25 M shared parameters and 100 k per task head;
overlap with the backward is ignored (DDP overlaps the loss weightings' all-reduce with the
backward, so theirs is an upper bound).

usage: python benchmarks/ddp_cost_model.py [--shared 25e6] [--head 1e5]
"""

from __future__ import annotations

import argparse
import math


def allreduce_seconds(nbytes: float, ranks: int) -> float:
    alpha, beta = (10e-6, 300e9) if ranks <= 8 else (20e-6, 50e9)
    if nbytes > 1 << 20:
        return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes / beta
    return 2 * math.log2(ranks) * alpha + 2 * nbytes / beta


def volumes(k: int, d: float, h: float) -> dict[str, list[float]]:
    """Each family's all-reduces per step (bytes of each), in the order mtlkit issues them."""
    heads = h * k
    return {
        "loss weighting": [16 * k, 4 * (d + heads)],
        "Gramian, representation level": [16 * k, 8 * k * k, 4 * (d + heads)],
        "parameter level, exact": [16 * k, 4 * k * d, 4 * heads],
        "parameter level, local Gramian": [16 * k, 8 * k * k, 4 * (d + heads)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=float, default=25e6)
    parser.add_argument("--head", type=float, default=1e5)
    args = parser.parse_args()
    ranks = [8, 16, 32, 64]
    print(f"d = {args.shared:.3g} shared parameters, {args.head:.3g} per task head; ms per step\n")
    print("| K | family | MB per rank | " + " | ".join(f"{r} GPUs" for r in ranks) + " |")
    print("|---:|---|---:|" + "---:|" * len(ranks))
    for k in (10, 100):
        for family, sizes in volumes(k, args.shared, args.head).items():
            cells = [sum(allreduce_seconds(n, r) for n in sizes) * 1e3 for r in ranks]
            print(
                f"| {k} | {family} | {sum(sizes) / 1e6:,.1f} | "
                + " | ".join(f"{c:.1f}" for c in cells)
                + " |"
            )


if __name__ == "__main__":
    main()
