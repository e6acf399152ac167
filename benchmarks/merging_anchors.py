"""mtlkit's merging methods beside FusionBench 0.2.33's and mergekit 0.1.5's, on the same state dicts
(the MLP-8 track's pretrained backbone and eight experts, 1.9M parameters each) and, for the
streaming comparison, the same safetensors files.

    pip install -e ".[bench]"   # fusion-bench==0.2.33, mergekit==0.1.5
    python benchmarks/merging_anchors.py --out benchmarks/results/merging_anchors.md

For each method where the libraries share semantics: the largest absolute difference between
mtlkit's merged tensors and each anchor's (over every tensor), wall time (median over interleaved
rounds) and the peak resident memory of one call above its start (the kernel's peak counter, reset
before each call; the script runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks leave the
process at once and every call is measured from the same floor). Ratios are anchor / mtlkit.
Every call gets ready inputs: FusionBench's module pools are built before the meters start (they
are consumed by its algorithms, so one per call); the rounds rotate the order of the libraries.
The file rows go from files to a written safetensors file in both libraries (mtlkit's ``save``,
mergekit-pytorch's writer); the file is read back for the comparison outside the meters.
Where the libraries' definitions differ, the row says which switch of mtlkit's reproduces the
anchor, or why the numbers cannot agree (different random streams). One thread.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from peak_memory import fix_mmap_threshold, measured

if __name__ == "__main__":  # before torch is imported: glibc reads the setting at start
    fix_mmap_threshold()

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mtlkit.bench.merging_track import mean, mlp8_track
from mtlkit.merging import merge

StateDict = dict[str, Tensor]


def measure_impl(impl: Any) -> tuple[StateDict, float, float]:
    """Prepare outside the meters, run under them; a file written is read back afterwards."""
    if isinstance(impl, Prepared):
        prepared = impl.prepare()
        out, seconds, peak = measured(lambda: impl.run(prepared))
        del prepared
    else:
        out, seconds, peak = measured(impl)
    return (load_file(out) if isinstance(out, Path) else out), seconds, peak


def max_diff(a: StateDict, b: StateDict) -> float:
    if set(a) != set(b):
        raise KeyError(f"different keys: {sorted(set(a) ^ set(b))[:5]}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def quiet() -> contextlib.AbstractContextManager[Any]:
    return contextlib.redirect_stdout(io.StringIO())  # FusionBench prints profiles and progress


# --- FusionBench 0.2.33 (modules in a pool; ``_pretrained_`` is its reserved key) -------------------


class Anchors:
    def __init__(
        self, make: Callable[[], nn.Module], pretrained: StateDict, experts: list[StateDict]
    ) -> None:
        self.make, self.pretrained, self.experts = make, pretrained, experts

    def module(self, state: StateDict) -> nn.Module:
        m = self.make()
        m.load_state_dict({k: v.clone() for k, v in state.items()})
        return m

    def pool(self, with_pretrained: bool = True) -> dict[str, nn.Module]:
        out = {"_pretrained_": self.module(self.pretrained)} if with_pretrained else {}
        out.update({f"expert_{i}": self.module(e) for i, e in enumerate(self.experts)})
        return out

    def fb_task_arithmetic(self, pool: dict[str, nn.Module], scaling: float) -> StateDict:
        from fusion_bench.method import TaskArithmeticAlgorithm

        with quiet():
            return dict(TaskArithmeticAlgorithm(scaling_factor=scaling).run(pool).state_dict())

    def fb_ties(
        self, pool: dict[str, nn.Module], scaling: float, percent: float, merge_func: str
    ) -> StateDict:
        from fusion_bench.method import TiesMergingAlgorithm

        algorithm = TiesMergingAlgorithm(
            scaling_factor=scaling, threshold=percent, remove_keys=[], merge_func=merge_func
        )
        with quiet():
            return dict(algorithm.run(pool).state_dict())

    def fb_average(self) -> StateDict:
        from fusion_bench.method.simple_average import simple_average

        return dict(simple_average([dict(e) for e in self.experts]))

    def fb_dare(self, pool: Any, scaling: float, drop: float) -> StateDict:
        from fusion_bench.method import DareTaskArithmetic

        algorithm = DareTaskArithmetic(
            scaling_factor=scaling, sparsity_ratio=drop, only_on_linear_weights=False, rescale=True
        )
        torch.manual_seed(0)
        with quiet():
            return dict(algorithm.run(pool).state_dict())

    def dare_pool(self) -> Any:
        from fusion_bench.modelpool import BaseModelPool

        return BaseModelPool(self.pool())

    def _task_vectors(self) -> list[StateDict]:
        return [{k: e[k] - self.pretrained[k] for k in self.pretrained} for e in self.experts]

    def fb_tsv(self) -> StateDict:
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction,
        )

        with quiet():
            merged = compute_and_sum_svd_mem_reduction(
                self._task_vectors(), exclude_keys=[], accelerator="cpu"
            )
        return {k: self.pretrained[k] + merged[k] for k in self.pretrained}

    def fb_iso(self, which: str) -> StateDict:
        from fusion_bench.method.isotropic_merging import iso_utils

        with quiet():
            if which == "iso_c":
                merged = iso_utils.iso_c(self._task_vectors(), accelerator="cpu", exclude_keys=None)
            else:
                merged = iso_utils.iso_cts(
                    self._task_vectors(), common_space_fraction=0.8, accelerator="cpu", exclude_keys=None
                )
        return {k: self.pretrained[k] + merged[k] for k in self.pretrained}

    def fb_slerp(self, t: float) -> StateDict:
        from fusion_bench.method.slerp.slerp import slerp_on_state_dicts

        return dict(slerp_on_state_dicts(t, self.experts[0], self.experts[1]))

    # --- mergekit 0.1.5 (per tensor, in memory) --------------------------------------------------

    def mk(self, method: str, parameters: dict[str, Any], base: bool = True, two: bool = False) -> StateDict:
        from mergekit.merge_methods import merge_state_dicts

        experts = self.experts[:2] if two else self.experts
        models: dict[str, StateDict] = {"base": self.pretrained} if base else {}
        models.update({f"expert_{i}": e for i, e in enumerate(experts)})
        torch.manual_seed(0)
        with torch.no_grad():
            return dict(
                merge_state_dicts(models, method, parameters=parameters, base="base" if base else None)
            )

    def mk_slerp(self, t: float) -> StateDict:
        from mergekit.merge_methods import merge_state_dicts

        models = {"a": self.experts[0], "b": self.experts[1]}
        return dict(merge_state_dicts(models, "slerp", parameters={"t": t}, base="a"))

    def mk_files(self, folder: Path, method: str, parameters: dict[str, Any], out: Path) -> Path:
        """mergekit-pytorch's in-process path: one lazy task per tensor over the files."""
        from mergekit.graph import Executor
        from mergekit.options import MergeOptions
        from mergekit.scripts.merge_raw_pytorch import (
            RawPyTorchMergeConfig,
            SimpleLoaderCache,
            plan_flat_merge,
        )

        config = RawPyTorchMergeConfig.model_validate(
            {
                "merge_method": method,
                "base_model": str(folder / "base.safetensors"),
                "models": [{"model": str(folder / f"t{i}.safetensors")} for i in range(len(self.experts))],
                "parameters": parameters,
                "dtype": "float32",
            }
        )
        SimpleLoaderCache().loaders.clear()
        tasks = plan_flat_merge(
            config, str(out), tensor_union=False, tensor_intersection=False, options=MergeOptions(quiet=True)
        )
        Executor(tasks, math_device="cpu", storage_device="cpu").execute()
        return out / "model.safetensors"  # read back outside the timer


@dataclass
class Prepared:
    """A call whose inputs are built before the meters start (FusionBench's module pools: the
    other libraries are handed ready state dicts too)."""

    prepare: Callable[[], Any]
    run: Callable[[Any], StateDict | Path]


Impl = Callable[[], StateDict | Path] | Prepared


@dataclass
class Case:
    label: str
    ours: Impl
    anchors: dict[str, Impl]
    note: str = ""


def cases(a: Anchors, files: Path, scratch: Path, precision: str) -> list[Case]:
    pre, experts = a.pretrained, {f"t{i}": e for i, e in enumerate(a.experts)}
    two = {"t0": a.experts[0], "t1": a.experts[1]}
    paths = {f"t{i}": str(files / f"t{i}.safetensors") for i in range(len(a.experts))}

    def ours(method: str, **options: Any) -> Callable[[], StateDict]:
        return lambda: merge(pre, experts, method, precision=precision, **options).state_dict

    counter = iter(range(10**6))
    # mergekit's TIES and the mtlkit switches that reproduce it
    per_tensor_ties = {
        "density": 0.2,
        "scaling": 0.3,
        "trim_scope": "per_tensor",
        "aggregate": "disjoint_mean",
        "rounding": "floor",
    }
    mergekit_ties = {"density": 0.2, "weight": 1.0, "lambda": 0.3, "normalize": True}

    def mk_files(method: str, parameters: dict[str, Any]) -> Callable[[], Path]:
        return lambda: a.mk_files(files, method, parameters, scratch / f"out{next(counter)}")

    def ours_files(method: str, **options: Any) -> Callable[[], Path]:
        """Files in, a safetensors file out (mtlkit's save, atomic, with its model card), as mergekit."""
        base = str(files / "base.safetensors")
        return lambda: merge(base, paths, method, precision=precision, **options).save(
            scratch / f"ours{next(counter)}.safetensors"
        )

    return [
        Case(
            "Task Arithmetic, scaling 0.3",
            ours("task_arithmetic", scaling=0.3),
            {
                "FusionBench": Prepared(a.pool, lambda pool: a.fb_task_arithmetic(pool, 0.3)),
                "mergekit": lambda: a.mk("task_arithmetic", {"weight": 1.0, "lambda": 0.3}),
            },
        ),
        Case(
            "Task Arithmetic from files (streamed)",
            ours_files("task_arithmetic", scaling=0.3),
            {"mergekit": mk_files("task_arithmetic", {"weight": 1.0, "lambda": 0.3})},
            "files in, a safetensors file out: mergekit-pytorch's planner and executor, mtlkit's merge and save",
        ),
        Case(
            "weight averaging",
            lambda: merge(None, experts, "average", precision=precision).state_dict,
            {"FusionBench": a.fb_average, "mergekit": lambda: a.mk("linear", {"weight": 1.0}, base=False)},
        ),
        *[
            Case(
                f"TIES, global top 20%, disjoint {kind}",
                ours(
                    "ties",
                    density=0.2,
                    scaling=0.3,
                    trim_scope="global",
                    aggregate=f"disjoint_{kind}",
                    rounding="ties_code",
                ),
                {"FusionBench": Prepared(a.pool, lambda pool, f=func: a.fb_ties(pool, 0.3, 20, f))},
                "mtlkit with rounding='ties_code' (FusionBench keeps int(density n) + 1 entries, as the TIES "
                f"code); {note}",
            )
            for kind, func, note in (("sum", "sum", "FusionBench's default"), ("mean", "mean", "the paper's"))
        ],
        Case(
            "TIES, per tensor top 20%, disjoint mean (mergekit's)",
            ours("ties", **per_tensor_ties),
            {"mergekit": lambda: a.mk("ties", mergekit_ties)},
            "mtlkit with rounding='floor' (mergekit keeps int(density n) entries per tensor), as a mergekit "
            "YAML is translated",
        ),
        Case(
            "TIES per tensor from files (streamed)",
            ours_files("ties", **per_tensor_ties),
            {"mergekit": mk_files("ties", mergekit_ties)},
            "as the row above, files in and a file out",
        ),
        Case(
            "DARE + TA, drop 0.5, rescale 1/(1-p)",
            ours("dare", drop_rate=0.5, scaling=0.3),
            {"FusionBench": Prepared(a.dare_pool, lambda pool: a.fb_dare(pool, 0.3, 0.5))},
            "random drops: each library draws its own stream, so the tensors differ by design (time and memory only)",
        ),
        Case(
            "DARE + TA, drop 0.5, L1 rescale (mergekit's dare_linear)",
            ours("dare", drop_rate=0.5, scaling=0.3, rescale="l1"),
            {"mergekit": lambda: a.mk("dare_linear", {"density": 0.5, "weight": 1.0, "lambda": 0.3})},
            "random drops, as above",
        ),
        Case("TSV-M", ours("tsv"), {"FusionBench": a.fb_tsv}),
        Case("Iso-C", ours("iso_c"), {"FusionBench": lambda: a.fb_iso("iso_c")}),
        Case("Iso-CTS (common fraction 0.8)", ours("iso_cts"), {"FusionBench": lambda: a.fb_iso("iso_cts")}),
        Case(
            "Model Breadcrumbs (drop bottom 10%, top 1%)",
            ours("breadcrumbs", density=0.89, top=0.01, scaling=1.0),
            {"mergekit": lambda: a.mk("breadcrumbs", {"density": 0.89, "gamma": 0.01, "weight": 1.0})},
            "mtlkit given mergekit's counts (density 0.89, top 0.01)",
        ),
        Case(
            "Model Stock (8 experts)",
            ours("model_stock"),
            {"mergekit": lambda: a.mk("model_stock", {})},
            "FusionBench averages pairwise angles instead of cosines for more than two experts: left out",
        ),
        Case(
            "SLERP, t = 0.5 (two experts)",
            lambda: merge(None, two, "slerp", t=0.5, precision=precision).state_dict,
            {"FusionBench": lambda: a.fb_slerp(0.5), "mergekit": lambda: a.mk_slerp(0.5)},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--precision",
        choices=["float32", "float64"],
        default="float32",
        help="mtlkit's working precision (the anchors compute in float32; mtlkit's default is float64)",
    )
    parser.add_argument("--only", nargs="*", help="run only cases whose label contains one of these")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from importlib.metadata import version

    import fusion_bench
    import fusion_bench.method  # noqa: F401
    import mergekit.merge_methods  # noqa: F401

    track = mlp8_track(args.seed)
    names = list(track.experts)
    anchors = Anchors(track.make_backbone, track.pretrained, [track.experts[n] for n in names])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "in"
        files.mkdir()
        save_file(track.pretrained, files / "base.safetensors")
        for i, n in enumerate(names):
            save_file(track.experts[n], files / f"t{i}.safetensors")
        for case in cases(anchors, files, Path(tmp), args.precision):
            if args.only and not any(s in case.label for s in args.only):
                continue
            print(case.label, flush=True)
            impls = {"mtlkit": case.ours, **case.anchors}
            timings: dict[str, list[float]] = {k: [] for k in impls}
            peaks: dict[str, list[float]] = {k: [] for k in impls}
            outputs: dict[str, StateDict] = {}
            order = list(impls)
            for r in range(args.rounds):  # interleaved rounds, the order rotated each round
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    out, seconds, peak = measure_impl(impls[name])
                    outputs[name] = out
                    timings[name].append(seconds)
                    peaks[name].append(peak)
            row: dict[str, Any] = {"label": case.label, "note": case.note, "impls": {}}
            for name in impls:
                row["impls"][name] = {
                    "seconds": statistics.median(timings[name]),
                    "peak_mib": statistics.median(peaks[name]),
                    "max_abs_diff": 0.0 if name == "mtlkit" else max_diff(outputs["mtlkit"], outputs[name]),
                    "test_average": mean(track.accuracy(outputs[name])),
                }
            rows.append(row)
    meta = {
        "command": f"python benchmarks/merging_anchors.py --seed {args.seed} --rounds {args.rounds} "
        f"--precision {args.precision}",
        "precision": args.precision,
        "torch": torch.__version__,
        "fusion_bench": version("fusion-bench"),
        "mergekit": version("mergekit"),
        "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg()[0],
    }
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    args.out.write_text(render(meta, rows, track))
    print(args.out.read_text())


def render(meta: dict[str, Any], rows: list[dict[str, Any]], track: Any) -> str:
    params = sum(v.numel() for v in track.pretrained.values())
    lines = [
        "# Merging: mtlkit beside FusionBench and mergekit on the same tensors",
        "",
        f"`{meta['command']}` · torch {meta['torch']}, fusion-bench {meta['fusion_bench']}, mergekit "
        f"{meta['mergekit']}, {meta['cpu']}, one thread, load average {meta['load_average']:.2f} at the end.",
        "",
        f"The MLP-8 track's pretrained backbone and its 8 experts ({params / 1e6:.2f}M float32 parameters each; "
        f"12 tensors). mtlkit merges in {meta['precision']} (its default is float64; the anchors compute in "
        "float32). Time: median of interleaved rounds; memory: peak resident size of one call above its "
        "start (MALLOC_MMAP_THRESHOLD_=65536). Ratios are anchor / mtlkit (above 1: mtlkit is faster or "
        "smaller). *max abs diff*: largest difference from mtlkit's merged tensors; *test avg*: the merged "
        "model's average test accuracy over the 8 tasks (%), so a difference shows what it costs.",
        "",
        "| method | anchor | max abs diff | test avg: mtlkit / anchor | mtlkit s | anchor s | time ratio | mtlkit MiB | anchor MiB | memory ratio | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = row["impls"]["mtlkit"]
        for name, r in row["impls"].items():
            if name == "mtlkit":
                continue
            lines.append(
                f"| {row['label']} | {name} | {r['max_abs_diff']:.2e} | {ours['test_average']:.2f} / {r['test_average']:.2f} | "
                f"{ours['seconds']:.3f} | {r['seconds']:.3f} | "
                f"{r['seconds'] / ours['seconds']:.2f} | {ours['peak_mib']:.1f} | {r['peak_mib']:.1f} | "
                f"{r['peak_mib'] / max(ours['peak_mib'], 1e-9):.2f} | {row['note']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
