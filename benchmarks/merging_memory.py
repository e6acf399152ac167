"""Peak memory of a per-tensor merge streamed from safetensors files against the same merge with
every model loaded first (one fresh process per cell; peak resident set size from the kernel).

The model: ``--tensors`` float32 matrices of ``--dim`` x ``--dim`` (24 x 1024^2 = 96 MiB by
default), a pretrained model and ``--experts`` fine-tunes, written once as safetensors files.
Reported per method: the peak resident size during the merge above its start (the kernel's
peak counter is reset after the imports), the
size of one model (the merged output is kept in memory in both modes), and what the streamed
merge holds beyond its output, in units of the largest tensor (the issue's target: about T + 2).

usage: python benchmarks/merging_memory.py [--experts 4] [--tensors 24] [--dim 1024]
                                           [--out benchmarks/results/merging_memory.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import mtlkit as mk
from safetensors.torch import load_file
folder, method, mode, experts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = json.loads(sys.argv[5])
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB
    raise RuntimeError(key)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one: only the merge counts
base_rss = status("VmRSS")
paths = {f"t{i}": f"{folder}/t{i}.safetensors" for i in range(experts)}
start = time.perf_counter()
if mode == "memory":
    pretrained = load_file(f"{folder}/base.safetensors")
    models = {k: load_file(v) for k, v in paths.items()}
    result = mk.merging.merge(pretrained, models, method, **options)
else:
    result = mk.merging.merge(f"{folder}/base.safetensors", paths, method, **options)
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"peak_kib": peak, "base_kib": base_rss, "seconds": seconds}))
"""

#: glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so resident memory
#: after a tensor is freed can stay high; a fixed low threshold returns large blocks at once
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
METHODS = {
    "task_arithmetic": {},
    "task_arithmetic, float32": {"precision": "float32"},
    "ties (per tensor)": {"trim_scope": "per_tensor"},
    "ties (per tensor), float32": {"trim_scope": "per_tensor", "precision": "float32"},
    "dare": {},
    "tsv": {},
}


def build(folder: Path, experts: int, tensors: int, dim: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(dim, dim, generator=gen) for i in range(tensors)}
    save_file(base, str(folder / "base.safetensors"))
    for t in range(experts):
        save_file(
            {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
            str(folder / f"t{t}.safetensors"),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tensors", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tensor_mib = args.dim * args.dim * 4 / 2**20
    model_mib = tensor_mib * args.tensors
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, args.experts, args.tensors, args.dim)
        for label in args.methods:
            method = label.split(",")[0].split(" ")[0]
            for allocator, env in ALLOCATORS.items():
                cells = {}
                for mode in ("stream", "memory"):
                    command = [sys.executable, "-c", CHILD, str(folder), method, mode, str(args.experts)]
                    run = subprocess.run(
                        [*command, json.dumps(METHODS[label])],
                        capture_output=True,
                        text=True,
                        check=True,
                        env={**os.environ, **env},
                    )
                    cells[mode] = json.loads(run.stdout.strip().splitlines()[-1])
                rows.append((f"{label}, {allocator}", cells))
    lines = [
        "| method | streamed: peak above baseline (MiB) | beyond the output (largest tensors) | in memory: peak above baseline (MiB) | streamed / in memory | streamed s | in memory s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, cells in rows:
        s = (cells["stream"]["peak_kib"] - cells["stream"]["base_kib"]) / 1024
        m = (cells["memory"]["peak_kib"] - cells["memory"]["base_kib"]) / 1024
        lines.append(
            f"| {label} | {s:.0f} | {(s - model_mib) / tensor_mib:.1f} | {m:.0f} | {s / m:.2f} | "
            f"{cells['stream']['seconds']:.2f} | {cells['memory']['seconds']:.2f} |"
        )
    load = os.getloadavg()
    text = "\n".join(
        [
            "# Merging memory: streamed from safetensors against loaded in memory",
            "",
            f"{args.experts} experts and a pretrained model of {args.tensors} float32 tensors of {args.dim} x {args.dim} "
            f"({tensor_mib:.0f} MiB each, {model_mib:.0f} MiB per model), written as safetensors files; one fresh "
            "process per cell, one thread; the peak resident size during the merge (VmHWM, reset after importing torch and mtlkit) above the resident size at its start. "
            "The merged model (one model's size) is kept in memory in both modes; merging computes in float64 (rows marked float32: precision='float32') "
            "(each expert's tensor is held as a float64 copy: two float32 tensors' worth). Each method runs with "
            "glibc's default allocator and with a fixed mmap threshold (glibc otherwise keeps freed tensor "
            "memory resident). "
            f"Load average at the end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}; {time.strftime('%Y-%m-%d')}. "
            f"Command: `python benchmarks/merging_memory.py --experts {args.experts} --tensors {args.tensors} --dim {args.dim}`.",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps({"rows": rows, "args": vars(args) | {"out": str(args.out)}}, indent=1)
        )


if __name__ == "__main__":
    main()
