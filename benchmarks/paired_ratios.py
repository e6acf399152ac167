"""Paired before/after ratios from a ``step_cost.py --before`` run's log (its stderr).

Every round times each configuration once, interleaved, so the ratio of ``mtlkit:X`` to
``before:X`` *within* a round cancels most of the load that the rounds saw; this prints the median
and interquartile range of those per-round ratios, with ``sum-again / sum`` (the same step twice)
as the noise floor.

usage: python benchmarks/paired_ratios.py LOG
"""

from __future__ import annotations

import collections
import re
import statistics
import sys
from pathlib import Path

LINE = re.compile(r"K=(\d+) round (\d+) (\S+): ([\d.]+) ms")


def read(path: Path) -> dict[tuple[int, str], dict[int, float]]:
    rows: dict[tuple[int, str], dict[int, float]] = collections.defaultdict(dict)
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if m:
            rows[(int(m[1]), m[3])][int(m[2])] = float(m[4])
    return rows


def cell(rows: dict[tuple[int, str], dict[int, float]], a: str, b: str, k: int) -> str:
    ratios = sorted(rows[(k, a)][i] / rows[(k, b)][i] for i in rows[(k, a)])
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f} ({low:.2f}-{high:.2f})"


def main() -> None:
    rows = read(Path(sys.argv[1]))
    ks = sorted({k for k, _ in rows})
    names = sorted({c.split(":")[1] for _, c in rows if c.startswith("before:")})
    print("| method | " + " | ".join(f"K={k}: after / before (IQR)" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    print("| noise: sum-again / sum | " + " | ".join(cell(rows, "sum-again", "sum", k) for k in ks) + " |")
    for n in names:
        print(f"| {n} | " + " | ".join(cell(rows, f"mtlkit:{n}", f"before:{n}", k) for k in ks) + " |")


if __name__ == "__main__":
    main()
