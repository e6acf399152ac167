"""A finer before/after check of single configurations: the two versions' steps alternate every
8 steps (12 rounds) in one pinned process, and the per-round ratio after/before is summarised.

usage: taskset -c 1 python benchmarks/ab_step_cost.py --before OLD_CHECKOUT/src K NAME [NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from step_cost import install_before, make_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("k", type=int)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    install_before(args.before)
    torch.set_num_threads(1)
    steps = {c: make_step(c, args.k) for n in args.names for c in (f"mtlkit:{n}", f"before:{n}")}
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {c: [] for c in steps}
    for _ in range(args.rounds):
        for c, step in steps.items():
            ts = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
            times[c].append(statistics.median(ts))
    print(f"| method | K | after / before, median (IQR) over {args.rounds} rounds | after ms | before ms |")
    print("|---|---|---|---|---|")
    for n in args.names:
        a, b = times[f"mtlkit:{n}"], times[f"before:{n}"]
        r = sorted(x / y for x, y in zip(a, b, strict=True))
        low, _, high = statistics.quantiles(r, n=4)
        print(
            f"| {n} | {args.k} | {statistics.median(r):.3f} ({low:.3f}-{high:.3f}) | "
            f"{1e3 * statistics.median(a):.1f} | {1e3 * statistics.median(b):.1f} |"
        )


if __name__ == "__main__":
    main()
