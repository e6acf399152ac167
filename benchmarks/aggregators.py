"""Side by side: every mtlkit gradient method and its TorchJD 0.18.0 / LibMTL 1.1.5 anchors.

usage: python benchmarks/aggregators.py [--ks 2 10 40 100 256] [--rounds 3] [--steps 20]
       [--warmup 3] [--only NAME ...] [--configs CONFIG ...] [--rep-variants] [--max-step-s 8]
       [--cell-s 10] [--min-steps 3] [--max-mem-mb MB] [--core N] [--out FILE.md] [--targets]
       python benchmarks/aggregators.py --from-json FILE.json [--out FILE.md] [--targets]

The full run (after ``make bench`` has installed the anchors; about 2 hours on an idle 2-core VM):
    .venv/bin/python benchmarks/aggregators.py --out benchmarks/results/aggregators.md --targets

The model, batch, seeds and step are ``step_cost.py``'s (input 256, trunk 256-512-512-256 ReLU,
K heads 256-64-1, MSE per task, batch 256, SGD; see ``make_step`` there). Configurations:

- ``sum``, ``floor``      the baselines: one summed-loss backward; K ``torch.autograd.grad`` calls;
- ``mtlkit:<name>``       every registered method whose class is a ``GramianWeighting`` or a
                          ``JacobianAggregator`` (found from the registry, variants such as
                          ``mgda_ub`` included); ``--rep-variants`` adds ``mtlkit:<name>-rep``, each
                          Gramian method at the representation level;
- ``torchjd:<Name>``      TorchJD's aggregators through ``autojac.mtl_backward`` + ``jac_to_grad``
                          (MoDo: its three-batch ``autojac.jac`` recipe), see ``anchors.py``;
- ``libmtl:<Name>[-rep]`` LibMTL's per-task-gradient weightings, called as its Trainer would
                          (``-rep``: ``rep_grad=True``), with the shims listed in ``anchors.py``.

COUNTERPARTS says which anchor is the like-for-like counterpart of which mtlkit method (the
report's last table, with the conventions that differ). A method with ``batches_per_step > 1``
gets fixed extra random batches; its floor is scaled by its batches per step.

Every (configuration, K, round) runs in its own forked child, pinned to one core with one thread;
rounds are interleaved. Ratios are medians over rounds of same-round ratios. The first two steps
of a cell are probes: a cell whose second step takes more than ``--max-step-s`` (or whose first
takes twice that) is skipped, and so is the configuration at every larger K; the timed steps are
as many as fit in ``--cell-s`` (``--min-steps`` .. ``--steps``). A child above ``--max-mem-mb``
is stopped; a crash is caught and shown ("crash: <reason>"). Peak memory is the child's peak RSS
minus its RSS before the model, data, optimizer and method were built, so whatever a method keeps
between steps counts; every configuration runs one step at K = 3 in the parent first, so that
imported code and lazy initialisation are shared, not counted. Solver time: an mtlkit Gramian
method's ``weights()`` (a Jacobian aggregator's ``direction()``), TorchJD's weighting module
(the Gramian weighting where there is one), as a share of the step. ``--targets`` prints the
issue's targets, met or not, with the numbers (also at the end of the report).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from anchors import LIBMTL_GRADIENT_METHODS, TORCHJD_BATCHES, libmtl_available, torchjd_names
from step_cost import _cpu_model, _rss_mb, _time_steps, create_method, make_step

BASELINES = ("sum", "floor")

#: mtlkit registry name -> its like-for-like anchor configurations
COUNTERPARTS: dict[str, tuple[str, ...]] = {
    "mgda": ("torchjd:MGDA", "libmtl:MGDA"),
    "mgda_ub": ("libmtl:MGDA-rep",),
    "upgrad": ("torchjd:UPGrad",),
    "dualproj": ("torchjd:DualProj",),
    "imtl_g": ("torchjd:IMTLG",),
    "imtl": ("libmtl:IMTL",),
    "pcgrad": ("torchjd:PCGrad", "libmtl:PCGrad"),
    "gradvac": ("torchjd:GradVac", "libmtl:GradVac"),
    "graddrop": ("libmtl:GradDrop-rep",),
    "cagrad": ("torchjd:CAGrad", "libmtl:CAGrad"),
    "nash_mtl": ("torchjd:NashMTL",),
    "aligned_mtl": ("torchjd:AlignedMTL",),
    "conflictfree": ("torchjd:ConFIG",),
    "fairgrad": ("torchjd:FairGrad",),
    "krum": ("torchjd:Krum",),
    "trimmed_mean": ("torchjd:TrimmedMean",),
    "excess_mtl": ("torchjd:ExcessMTL",),
    "modo": ("torchjd:MoDo",),
    "sdmgrad": ("torchjd:SDMGrad",),
    "pcd": ("torchjd:PCD",),  # once mtlkit registers it
}
#: shown beside a method, but not like-for-like (not used in the ratios)
RELATED: dict[str, tuple[str, ...]] = {"graddrop": ("torchjd:GradDrop",)}
#: what differs between a method and an anchor, beyond the costs
NOTES: dict[str, str] = {
    "torchjd:Mean": "no counterpart: the cost of TorchJD's Jacobian path itself",
    "libmtl:MGDA-rep": "heads read detached copies of the representation (its HPS rep_grad mode)",
    "libmtl:IMTL": "the IMTL hybrid (learnable loss scales in the optimizer), as mtlkit:imtl",
    "libmtl:CAGrad": "its objective reshapes to (1, 3): crashes unless K = 3; scipy SLSQP; calpha=0.5 "
    "(mtlkit c=0.4)",
    "libmtl:PCGrad": "Python loop over K^2 task pairs with host syncs",
    "libmtl:GradVac": "Python loop over K^2 task pairs with host syncs",
    "libmtl:MGDA": "Frank-Wolfe with Python loops (the K^2/2 pair scan for the start point)",
    "torchjd:NashMTL": "cvxpy (ECOS) solve every step on the normalised Gramian; max_norm=1",
    "torchjd:GradDrop": "parameter level (mtlkit's graddrop default and LibMTL's act on the representation)",
    "torchjd:Krum": "needs K >= 3 (n_byzantine + 3)",
    "torchjd:MoDo": "three batches: two autojac.jac trunk Jacobians, their cross Gramian, then the third "
    "batch's losses back-propagated with the weights: 2K + 1 backward passes (mtlkit: 3K, the third batch's "
    "per-task gradients too); heads: that weighted gradient (mtlkit: the average of their own over the three)",
    "torchjd:SDMGrad": "SDMGradWeighting on the one-batch Gramian (mtlkit's independent_batches=False)",
    "torchjd:ExcessMTL": "weighting of the Jacobian itself",
}
#: how each anchor library is driven, unless the anchor is in OWN_DRIVERS
LIBRARY_NOTES = {
    "torchjd": "`mtl_backward(losses, features=z)` (the trunk Jacobian, one row per task, by vmap "
    "through the trunk; each head its own gradient), then `jac_to_grad(trunk, aggregator)`",
    "libmtl": "`weighting.backward(losses, **config defaults)`: K `loss.backward(retain_graph=True)` "
    "passes, each task's trunk gradient copied into a K x d float32 buffer (`-rep`: the "
    "representation gradient, heads reading detached copies); each head its own gradient",
}
#: what the anchor libraries have and the benchmark does not drive
NOT_DRIVEN = (
    "TorchJD's CRMOGMWeighting (a weighting of a statistic, no aggregator), Constant, Sum and "
    "Random (trivial); its scalarizers and LibMTL's loss weightings (EW, UW, DWA, GLS, GradNorm, "
    "RLW) are in `step_cost.py`. LibMTL 1.1.5 has no Nash-MTL, Aligned-MTL, DB-MTL, MoCo, "
    "ExcessMTL, FairGrad, UPGrad, MoDo or SDMGrad weighting."
)
#: Gramian methods whose speed-up over the faster anchor must be at least 2x (target 1)
TWO_X = ("nash_mtl", "gradvac", "fairgrad", "conflictfree", "cagrad")


# -- configurations --------------------------------------------------------------------------------
def gradient_method_names() -> list[str]:
    """Every registered mtlkit method whose class is a GramianWeighting or a JacobianAggregator."""
    from mtlkit.methods import GramianWeighting, JacobianAggregator, available, method_class

    return [n for n in available() if issubclass(method_class(n), (GramianWeighting, JacobianAggregator))]


def rep_variant_names() -> list[str]:
    """``<name>-rep`` for every parameter-level Gramian method that accepts the representation
    level and has no registered representation-level variant already (as mgda has mgda_ub)."""
    from mtlkit.methods import GramianWeighting, method_class
    from mtlkit.methods.registry import variant_defaults

    names = gradient_method_names()
    covered = {method_class(n) for n in names if variant_defaults(n).get("level") == "representation"}
    out = []
    for n in names:
        cls = method_class(n)
        if not issubclass(cls, GramianWeighting) or cls in covered or create_method(n).level != "parameter":
            continue
        try:
            create_method(f"{n}-rep")
        except Exception:  # a method that refuses the representation level
            continue
        out.append(f"{n}-rep")
    return out


def counterparts(config: str, related: bool = False) -> tuple[str, ...]:
    """The anchor configurations beside ``mtlkit:<name>``: like-for-like (COUNTERPARTS), and with
    ``related`` also the others shown beside it. ``<name>-rep`` pairs with LibMTL's ``-rep``
    anchors of ``<name>``."""
    name = config.partition(":")[2]
    base = name.removesuffix("-rep")
    found = COUNTERPARTS.get(base, ()) + (RELATED.get(base, ()) if related else ())
    if base == name:
        return found
    rep = [f"{a}-rep" for a in found if a.startswith("libmtl:")]
    return tuple(a for a in rep if a.partition(":")[2] in LIBMTL_GRADIENT_METHODS)


def anchor_configs() -> list[str]:
    """Every anchor configuration of the installed anchor libraries."""
    configs = [f"torchjd:{n}" for n in torchjd_names()]
    if libmtl_available():
        configs += [f"libmtl:{n}" for n in LIBMTL_GRADIENT_METHODS]
    return configs


def select_configs(only: list[str] | None, rep_variants: bool) -> list[str]:
    """The baselines, then each mtlkit method followed by its anchors, then the anchors without an
    mtlkit counterpart; ``only`` keeps the named mtlkit methods (and their anchors)."""
    methods = gradient_method_names() + (rep_variant_names() if rep_variants else [])
    if only:
        unknown = sorted(set(only) - set(methods))
        if unknown:
            raise SystemExit(f"--only: no gradient method {unknown}; these are: {' '.join(methods)}")
        methods = [m for m in methods if m in only]
    installed = set(anchor_configs())
    configs = list(BASELINES)
    for m in methods:
        configs += [f"mtlkit:{m}"] + [a for a in counterparts(f"mtlkit:{m}", True) if a in installed]
    if not only:
        configs += [a for a in anchor_configs() if a not in configs]
    return list(dict.fromkeys(configs))


def config_info(config: str) -> dict[str, Any]:
    """What the report and the targets need to know about a configuration: its library, family
    (gramian / jacobian / baseline / anchor), level, head convention and batches per step."""
    lib, _, name = config.partition(":")
    if not name:
        return {"lib": "torch", "family": "baseline", "level": "parameter", "heads": "own", "batches": 1}
    if lib == "mtlkit":
        from mtlkit.methods import GramianWeighting

        method = create_method(name)
        family = "gramian" if isinstance(method, GramianWeighting) else "jacobian"
        return {
            "lib": lib,
            "family": family,
            "level": method.level,
            "heads": method.head_grad,
            "batches": method.batches_per_step,
        }
    level = "representation" if name.endswith("-rep") else "parameter"
    heads = "weighted (third batch)" if config == "torchjd:MoDo" else "own"
    return {
        "lib": lib,
        "family": "anchor",
        "level": level,
        "heads": heads,
        "batches": TORCHJD_BATCHES.get(name, 1) if lib == "torchjd" else 1,
    }


# -- one cell --------------------------------------------------------------------------------------
@dataclass
class Limits:
    """How long and how large one cell may get."""

    steps: int  # most timed steps per round
    min_steps: int  # fewest timed steps per round
    warmup: int  # warm-up steps, the two probe steps included (at least 2)
    cell_s: float  # timed seconds per round: fewer steps when a step is slow
    max_step_s: float  # a cell whose second step is slower is skipped
    max_mem_mb: float  # a child whose RSS (the parent's shared pages included) gets above is stopped
    build_s: float = 300.0  # building the model and the method (cvxpy problems included)


def install_solver_timer(step: Callable[[], None]) -> list[float] | None:
    """Time the weight solve of ``step``'s method: an mtlkit GramianWeighting's ``weights()`` or a
    JacobianAggregator's ``direction()``; a TorchJD aggregator's Gramian weighting (its weighting,
    or the whole aggregator when it has none). Returns the list the durations go to, or None."""
    times: list[float] = []
    method = getattr(step, "method", None)
    if method is not None:
        from mtlkit.methods import GramianWeighting, JacobianAggregator

        attr = {GramianWeighting: "weights", JacobianAggregator: "direction"}
        name = next((a for cls, a in attr.items() if isinstance(method, cls)), None)
        if name is None:
            return None
        inner = getattr(method, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                times.append(time.perf_counter() - t0)

        method.__dict__[name] = timed  # shadows the bound method for this instance
        return times
    agg = getattr(step, "aggregator", None)
    if agg is None:
        return None
    from torchjd.aggregation import GramianWeightedAggregator, WeightedAggregator

    target = agg  # a plain aggregator (ConFIG, GradDrop, TrimmedMean), or MoDo's weighting: all of it
    if isinstance(agg, GramianWeightedAggregator):
        target = agg.gramian_weighting
    elif isinstance(agg, WeightedAggregator):
        target = agg.weighting
    started: list[float] = []
    target.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    target.register_forward_hook(lambda *_: times.append(time.perf_counter() - started.pop()))
    return times


def _reset_peak_rss() -> None:
    """Return freed heap to the system and restart the peak-RSS mark (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return math.nan


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:70] if text else ''}".rstrip(": ")


def _cell_child(config: str, k: int, limits: Limits, core: int | None, conn: Any) -> None:
    """Build ``config`` at K tasks, probe, warm up and time it; report through ``conn``:
    ("built",), ("probe", seconds) twice, then ("done", cell), ("slow", seconds), ("big", MB) or
    ("crash", why)."""
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    _reset_peak_rss()
    rss0 = _rss_mb()  # before the model, data, optimizer and method exist
    try:
        step = make_step(config, k)
        solver = install_solver_timer(step)
        conn.send(("built",))
        probe = 0.0
        for _ in range(2):
            probe = _time_steps(step, 1)[0]
            conn.send(("probe", probe))
        if probe > limits.max_step_s:
            conn.send(("slow", probe))
            return
        if _peak_rss_mb() > limits.max_mem_mb:  # the parent's watchdog may miss a short peak
            conn.send(("big", _peak_rss_mb()))
            return
        _time_steps(step, max(0, limits.warmup - 2))
        n = max(limits.min_steps, min(limits.steps, int(limits.cell_s / max(probe, 1e-9))))
        if solver is not None:
            solver.clear()
        times = _time_steps(step, n)
        cell = {
            "times": times,
            "solver_s": None if solver is None else sum(solver),
            "mem_mb": _peak_rss_mb() - rss0,
        }
        conn.send(("done", cell))
    except Exception as err:
        conn.send(("crash", _short(err)))
    finally:
        conn.close()


def _child_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def run_cell(config: str, k: int, limits: Limits, core: int | None) -> dict[str, Any]:
    """One forked child for (config, K): ``{"status": "ok", "times": [...], ...}``, or a status
    "skipped: ..." / "crash: ..." when it was too slow, too large or failed."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_cell_child, args=(config, k, limits, core, send), daemon=True)
    proc.start()
    send.close()
    # how long each next message may take: building, the first step (one-time set-up included),
    # the second step, then the warm-up and timed steps
    waits = [limits.build_s, 2 * limits.max_step_s + 1, limits.max_step_s + 1]
    waits.append(3 * limits.cell_s + (limits.warmup + 1) * limits.max_step_s + 10)
    slow = f"skipped: > {limits.max_step_s:g} s/step"
    big = f"skipped: > {limits.max_mem_mb:.0f} MB"
    status: dict[str, Any] | None = None
    deadline = time.monotonic() + waits.pop(0)
    while status is None:
        if recv.poll(0.1):
            try:
                msg = recv.recv()
            except EOFError:
                proc.join(5)
                status = {"status": f"crash: child exited with code {proc.exitcode}"}
                break
            kind = msg[0]
            if kind == "done":
                status = {"status": "ok", **msg[1]}
            elif kind == "slow":
                status = {"status": slow}
            elif kind == "big":
                status = {"status": big}
            elif kind == "crash":
                status = {"status": f"crash: {msg[1]}"}
            else:
                deadline = time.monotonic() + (waits.pop(0) if waits else limits.build_s)
        elif _child_rss_mb(proc.pid) > limits.max_mem_mb:
            status = {"status": big}
        elif time.monotonic() > deadline:
            status = {"status": slow}
        elif not proc.is_alive() and not recv.poll(0):
            status = {"status": f"crash: child exited with code {proc.exitcode}"}
    if proc.is_alive():
        proc.kill()
    proc.join()
    recv.close()
    return status


# -- the benchmark ---------------------------------------------------------------------------------
def preload(configs: list[str]) -> None:
    """Run every configuration once at K = 3 in this process, so that imports and lazy set-up
    (cvxpy, vmap, solver modules) are shared with the children instead of counted in their memory."""
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for config in configs:
            with contextlib.suppress(Exception):  # a crash shows in its cells
                make_step(config, 3)()


def run(configs: list[str], ks: list[int], rounds: int, limits: Limits, core: int | None) -> dict:
    """Every cell, rounds interleaved per K: ``raw[config][K]`` = {"status", "rounds": [...]}.
    A configuration skipped for time or memory at some K is not run at larger K."""
    raw: dict[str, dict[int, dict[str, Any]]] = {c: {} for c in configs}
    dropped: dict[str, str] = {}
    for k in ks:
        for c in configs:
            raw[c][k] = {"status": dropped.get(c, "ok"), "rounds": []}
        for r in range(rounds):
            for c in configs:
                if raw[c][k]["status"] != "ok":
                    continue
                # the baselines are never skipped for time: every ratio needs them
                cell = run_cell(
                    c, k, replace(limits, max_step_s=math.inf) if c in BASELINES else limits, core
                )
                if cell["status"] == "ok":
                    raw[c][k]["rounds"].append({key: v for key, v in cell.items() if key != "status"})
                    shown = f"{1e3 * statistics.median(cell['times']):.1f} ms"
                else:
                    raw[c][k] = {"status": cell["status"], "rounds": []}
                    if cell["status"].startswith("skipped") and c not in BASELINES:
                        dropped[c] = f"{cell['status']} (at K={k})"
                    shown = cell["status"]
                print(f"K={k} round {r + 1} {c}: {shown}", file=sys.stderr, flush=True)
        if any(raw[b][k]["status"] != "ok" for b in BASELINES if b in raw):
            raise SystemExit(f"a baseline failed at K={k}: {[raw[b][k]['status'] for b in BASELINES]}")
    return raw


def _round_medians(cell: dict[str, Any]) -> list[float]:
    return [statistics.median(r["times"]) for r in cell["rounds"]]


def summarise(raw: dict, info: dict[str, dict]) -> dict:
    """Per (config, K): status, ms, x sum, x floor (scaled by batches per step), peak MB, x sum's
    peak, solver share; plus the per-round medians."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for c, per_k in raw.items():
        out[c] = {}
        for k, cell in per_k.items():
            if cell["status"] != "ok":
                out[c][k] = {"status": cell["status"]}
                continue
            med = _round_medians(cell)
            base, floor = _round_medians(raw["sum"][k]), _round_medians(raw["floor"][k])
            mem = max(r["mem_mb"] for r in cell["rounds"])
            sum_mem = max(r["mem_mb"] for r in raw["sum"][k]["rounds"])
            shares = [r["solver_s"] / sum(r["times"]) for r in cell["rounds"] if r["solver_s"] is not None]
            solver_ms = [
                1e3 * r["solver_s"] / len(r["times"]) for r in cell["rounds"] if r["solver_s"] is not None
            ]
            out[c][k] = {
                "status": "ok",
                "ms": 1e3 * statistics.median([t for r in cell["rounds"] for t in r["times"]]),
                "x_sum": statistics.median(m / b for m, b in zip(med, base, strict=True)),
                "x_floor": statistics.median(m / f for m, f in zip(med, floor, strict=True))
                / info[c]["batches"],
                "mem_mb": mem,
                "mem_x_sum": mem / sum_mem if sum_mem > 0 else math.nan,
                "solver_share": statistics.median(shares) if shares else None,
                "solver_ms": statistics.median(solver_ms) if solver_ms else None,
                "round_ms": [1e3 * m for m in med],
                "steps": [len(r["times"]) for r in cell["rounds"]],
            }
    return out


def versus_anchors(raw: dict, summary: dict, config: str, k: int, limits: dict) -> dict[str, Any] | None:
    """mtlkit / the faster like-for-like anchor (time: median of same-round ratios) and mtlkit / the
    lower anchor (peak memory; ``above_sum``: the same for the memory above the ``sum`` step's) at K;
    ``bound`` when every anchor was skipped (then the ratio is at most the value shown)."""
    mine = summary[config].get(k)
    if not mine or mine["status"] != "ok":
        return None
    anchors = [a for a in counterparts(config) if a in summary and k in summary[a]]
    if not anchors:
        return None
    ok = [a for a in anchors if summary[a][k]["status"] == "ok"]
    result: dict[str, Any] = {"anchors": {a: summary[a][k]["status"] for a in anchors}}
    if ok:
        fast = min(ok, key=lambda a: summary[a][k]["ms"])
        ratios = [
            m / a for m, a in zip(_round_medians(raw[config][k]), _round_medians(raw[fast][k]), strict=True)
        ]
        result["time"] = {"anchor": fast, "ratio": statistics.median(ratios), "bound": False}
        low = min(ok, key=lambda a: summary[a][k]["mem_mb"])
        base = summary["sum"][k]["mem_mb"]  # model, data and a plain step: the same for both
        result["mem"] = {
            "anchor": low,
            "ratio": mine["mem_mb"] / summary[low][k]["mem_mb"],
            "above_sum": (mine["mem_mb"] - base) / max(summary[low][k]["mem_mb"] - base, 1e-9),
            "bound": False,
        }
    elif all(
        summary[a][k]["status"].startswith("skipped: >") and "s/step" in summary[a][k]["status"]
        for a in anchors
    ):
        ratio = mine["ms"] / (1e3 * limits["max_step_s"])
        result["time"] = {"anchor": anchors[0], "ratio": ratio, "bound": True}
    return result


# -- the report ------------------------------------------------------------------------------------
def _time_cell(s: dict[str, Any]) -> str:
    return f"{s['ms']:.1f} ({s['x_sum']:.2f}x) [{s['x_floor']:.2f}x]"


def _memory_cell(s: dict[str, Any]) -> str:
    return f"{s['mem_mb']:.0f} ({s['mem_x_sum']:.1f}x)"


def _solver_cell(s: dict[str, Any]) -> str:
    if s.get("solver_share") is None:
        return "—"
    return f"{100 * s['solver_share']:.1f}% ({s['solver_ms']:.2f})"


def _versus_cell(v: dict[str, Any] | None, key: str) -> str:
    if v is None:
        return "—"
    if key not in v:
        return "no anchor result: " + ", ".join(f"{a} {s.partition(':')[0]}" for a, s in v["anchors"].items())
    got = v[key]
    return f"{'< ' if got['bound'] else ''}{got['ratio']:.2f}x ({got['anchor']})"


def _table(rows: list[str], ks: list[int], head: str, cell: Callable[[str, int], str]) -> list[str]:
    lines = [f"| {head} | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {r} | " + " | ".join(cell(r, k) for k in ks) + " |" for r in rows]
    return lines


def report(data: dict) -> str:
    """The markdown report of a run (or of its JSON)."""
    meta, info, summary, vs = data["meta"], data["configs"], data["summary"], data["versus"]
    ks = sorted({k for per_k in summary.values() for k in per_k})
    configs = list(info)
    mk = [c for c in configs if info[c]["lib"] == "mtlkit"]

    def cells(fmt: Callable[[dict[str, Any]], str], brief: bool = False) -> Callable[[str, int], str]:
        """A cell per (config, K): ``fmt`` of a measured cell, else its status ("crash" when brief)."""

        def cell(c: str, k: int) -> str:
            s = summary[c].get(k)
            if s is None:
                return "—"
            if s["status"] == "ok":
                return fmt(s)
            return "crash" if brief and s["status"].startswith("crash") else s["status"]

        return cell

    def versus(key: str) -> Callable[[str, int], str]:
        return lambda c, k: _versus_cell(vs.get(c, {}).get(str(k)), key)

    timed = [c for c in configs if any((summary[c].get(k) or {}).get("solver_share") is not None for k in ks)]
    return "\n".join(
        [
            "# mtlkit gradient methods beside TorchJD and LibMTL",
            "",
            *environment_lines(meta),
            "",
            "## Step time",
            "",
            "ms per step (x `sum`) [x `floor`, scaled by batches per step]:",
            "",
            *_table(configs, ks, "configuration", cells(_time_cell)),
            "",
            "## mtlkit against the faster like-for-like anchor",
            "",
            "mtlkit time / the faster anchor's (below 1: mtlkit is faster; `<`: every anchor skipped):",
            "",
            *_table(mk, ks, "method", versus("time")),
            "",
            "mtlkit peak memory / the lower anchor's:",
            "",
            *_table(mk, ks, "method", versus("mem")),
            "",
            "## Peak memory",
            "",
            MEMORY_NOTE,
            "",
            "MB (x `sum`):",
            "",
            *_table(configs, ks, "configuration", cells(_memory_cell, brief=True)),
            "",
            "## Solver time",
            "",
            SOLVER_NOTE,
            "",
            "share of the step (ms per step):",
            "",
            *_table(timed, ks, "configuration", cells(_solver_cell, brief=True)),
            "",
            "## Counterparts and conventions",
            "",
            *mapping_lines(info),
            "",
            "## Targets",
            "",
            *target_lines(data),
            "",
        ]
    )


MEMORY_NOTE = (
    "Peak memory = the child's peak RSS minus its RSS before the model, data, optimizer and method "
    "were built: model and data (the same for every configuration at a K), the method's state kept "
    "between steps (buffers, reused K x d buffers, solver state) and the step's own peak all count. "
    "Imports and one-time set-up are done in the parent before forking (one step at K = 3 of every "
    "configuration), so they do not count; the shared code pages and allocator arenas a child "
    "touches do, a fixed part of every figure (most of the `sum` cell's at small K). The memory "
    "target is checked on this whole figure; its lines also give the ratio of the parts above "
    "the `sum` cell's."
)
SOLVER_NOTE = (
    "mtlkit: the time inside `weights()` (Gramian methods; the Gramian is already formed) or "
    "`direction()` (Jacobian aggregators: the whole aggregation of the K x d rows). TorchJD: its "
    "Gramian weighting module, or its weighting of the Jacobian where there is no Gramian weighting "
    "(NashMTL, ExcessMTL: Gramian formation included), or the whole aggregator (ConFIG, GradDrop, "
    "TrimmedMean). LibMTL: not timed (inline in its backward)."
)


def environment_lines(meta: dict[str, Any]) -> list[str]:
    lim = meta["limits"]
    return [
        f"Command: `{meta['command']}`",
        "",
        f"{meta['date']}; mtlkit {meta['mtlkit']}; torch {meta['torch']}, TorchJD {meta['torchjd']}, "
        f"LibMTL {meta['libmtl']}; Python {meta['python']}; {meta['cpu']}, {meta['cpus']} CPUs, one "
        f"thread pinned to core {meta['core']}; load average (1, 5, 15 min) at start "
        f"{meta['load_start']}, at end {meta['load_end']}.",
        "",
        f"Rounds: {meta['rounds']}, interleaved; per round and cell one forked child: 2 probe steps, "
        f"{lim['warmup']} warm-up steps in all, then {lim['min_steps']}-{lim['steps']} timed steps "
        f"(as many as fit in {lim['cell_s']:g} s). Skipped: a second step over {lim['max_step_s']:g} s "
        f"(then also at every larger K), a child over {lim['max_mem_mb']:.0f} MB. Batch 256, trunk "
        "256-512-512-256, heads 256-64-1, MSE, SGD (`step_cost.make_step`).",
    ]


def mapping_lines(info: dict[str, dict]) -> list[str]:
    """Which anchor is whose counterpart, and the conventions of each configuration."""
    lines = [
        "| mtlkit | family, level | heads | batches | like-for-like anchors | also shown |",
        "|---|---|---|---|---|---|",
    ]
    for c, i in info.items():
        if i["lib"] != "mtlkit":
            continue
        like = ", ".join(counterparts(c)) or "none"
        related = ", ".join(a for a in counterparts(c, True) if a not in counterparts(c)) or ""
        lines.append(
            f"| {c} | {i['family']}, {i['level']} | {i['heads']} | {i['batches']} | {like} | {related} |"
        )
    lines += ["", *(f"- {lib}: {text}." for lib, text in LIBRARY_NOTES.items()), ""]
    lines += ["| anchor | level | heads | notes |", "|---|---|---|---|"]
    for c, i in info.items():
        if i["family"] == "anchor":
            note = NOTES.get(c, "")
            lines.append(f"| {c} | {i['level']} | {i['heads']} | {note} |")
    heads = (
        "Heads: `own` = each head gets its own task's gradient; `weighted` = its task's weight times "
        "that (mtlkit's default for these methods; the anchors give own gradients)."
    )
    return [*lines, "", heads, "", f"Not driven: {NOT_DRIVEN}"]


# -- targets ---------------------------------------------------------------------------------------
def _verdict(ok: list[bool]) -> str:
    if not ok:
        return "not measured"
    return "met" if all(ok) else "NOT met"


def _measured(summary: dict, c: str, k: int) -> dict[str, Any] | None:
    s = summary[c].get(k)
    return s if s and s["status"] == "ok" else None


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _target_floor_and_anchor(data: dict, methods: list[str]) -> tuple[str, list[str]]:
    """(1) parameter-level Gramian methods at K=40: <= 1.2x the floor, and >= 1.5x (TWO_X: 2x)
    faster than the faster anchor."""
    lines, oks = [], []
    for c in methods:
        s, v = _measured(data["summary"], c, 40), data["versus"].get(c, {}).get("40")
        if s is None:
            status = (data["summary"][c].get(40) or {}).get("status", "not run")
            lines.append(f"  - {c}: not measured at K=40 ({status})")
            continue
        need = 2.0 if c.partition(":")[2] in TWO_X else 1.5
        ok = s["x_floor"] <= 1.2
        text = f"{s['x_floor']:.2f}x floor"
        if v and "time" in v:
            speed = 1 / v["time"]["ratio"]
            ok = ok and speed >= need
            more = "> " if v["time"]["bound"] else ""
            text += f", speed-up {more}{speed:.2f}x over {v['time']['anchor']} (need {need:g}x)"
        else:
            text += ", no anchor measured"
        oks.append(ok)
        lines.append(f"  - {c}: {text} -> {_met(ok)}")
    head = (
        "Gramian methods within 1.2x of the floor at K=40 and >= 1.5x "
        f"(2x: {', '.join(TWO_X)}) faster than the faster anchor"
    )
    return f"{head}: {_verdict(oks)}", lines


def _target_representation(data: dict, methods: list[str]) -> tuple[str, list[str]]:
    """(2) representation-level methods: <= 1.6x a summed step at K=40, <= 3x at K=256."""
    lines, oks = [], []
    for c in methods:
        parts, ok = [], []
        for k, bound in ((40, 1.6), (256, 3.0)):
            s = _measured(data["summary"], c, k)
            if s is None:
                parts.append(f"K={k}: not measured")
                continue
            ok.append(s["x_sum"] <= bound)
            parts.append(f"K={k}: {s['x_sum']:.2f}x sum (<= {bound:g})")
        oks += ok
        lines.append(f"  - {c}: {', '.join(parts)} -> {_verdict(ok)}")
    return f"Representation level at most 1.6x a summed step at K=40, 3x at K=256: {_verdict(oks)}", lines


def _target_memory(data: dict, methods: list[str]) -> tuple[str, list[str]]:
    """(3) peak memory at K=40 at most a quarter of the lower like-for-like anchor's (checked on the
    whole peak; the ratio of the memory above the ``sum`` step's is shown beside it)."""
    lines, oks = [], []
    for c in methods:
        v = data["versus"].get(c, {}).get("40")
        if v and "mem" in v:
            mem = v["mem"]
            oks.append(mem["ratio"] <= 0.25)
            above = f"above the sum step's: {mem['above_sum']:.2f}x"
            lines.append(f"  - {c}: {mem['ratio']:.2f}x of {mem['anchor']} ({above}) -> {_met(oks[-1])}")
    return f"Peak memory at most 1/4 of the lower anchor's at K=40: {_verdict(oks)}", lines


def _target_solver(data: dict, methods: list[str]) -> tuple[str, list[str]]:
    """(4) Gramian methods: time in ``weights()`` under 10% of the step at K=256."""
    lines, oks = [], []
    for c in methods:
        s = _measured(data["summary"], c, 256)
        if s is None or s.get("solver_share") is None:
            lines.append(f"  - {c}: not measured at K=256")
            continue
        oks.append(s["solver_share"] < 0.10)
        share = f"{100 * s['solver_share']:.1f}% ({s['solver_ms']:.1f} ms)"
        lines.append(f"  - {c}: {share} -> {_met(oks[-1])}")
    return f"Solver time under 10% of the step at K=256: {_verdict(oks)}", lines


def target_lines(data: dict) -> list[str]:
    """The issue's four targets, each met / NOT met / not measured, with the numbers per method."""
    info = data["configs"]
    mk = [c for c in info if info[c]["lib"] == "mtlkit"]
    gramian = [c for c in mk if info[c]["family"] == "gramian"]
    checks = [
        _target_floor_and_anchor(data, [c for c in gramian if info[c]["level"] == "parameter"]),
        _target_representation(data, [c for c in mk if info[c]["level"] == "representation"]),
        _target_memory(data, mk),
        _target_solver(data, gramian),
    ]
    out: list[str] = []
    for i, (head, lines) in enumerate(checks, 1):
        out += [f"{i}. {head}", *lines]
    return out


# -- main ------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _mtlkit_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return f"{_version('mtlkit')} (git {rev}{', uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        return _version("mtlkit")


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 10, 40, 100, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="most timed steps per cell and round")
    parser.add_argument("--min-steps", type=int, default=3, help="fewest timed steps per cell and round")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps, the two probes included")
    parser.add_argument("--cell-s", type=float, default=10.0, help="timed seconds per cell and round")
    parser.add_argument("--max-step-s", type=float, default=8.0, help="skip a cell whose step is slower")
    parser.add_argument("--max-mem-mb", type=float, default=None, help="default: half the available memory")
    parser.add_argument("--only", nargs="+", default=None, help="these mtlkit methods and their anchors")
    parser.add_argument("--configs", nargs="+", default=None, help="exactly these (the baselines are added)")
    parser.add_argument("--rep-variants", action="store_true", help="add <name>-rep for every Gramian method")
    parser.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the last one)")
    parser.add_argument(
        "--out", type=Path, default=None, help="the markdown report (and FILE.json beside it)"
    )
    parser.add_argument("--targets", action="store_true", help="print the target checks")
    parser.add_argument("--from-json", type=Path, default=None, help="report a saved run instead of running")
    args = parser.parse_args()
    args.warmup = max(2, args.warmup)
    return args


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024.0
    return 8192.0


def measure_all(args: argparse.Namespace) -> dict:
    """Run the benchmark; return everything the report and the JSON hold."""
    os.environ["OMP_NUM_THREADS"] = "1"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    core = args.core if args.core is not None else (cores[-1] if cores else None)
    configs = select_configs(args.only, args.rep_variants)
    if args.configs:
        configs = list(dict.fromkeys([*BASELINES, *args.configs]))
        unknown = [c for c in configs if c.startswith(("torchjd:", "libmtl:")) and c not in anchor_configs()]
        if unknown:
            raise SystemExit(
                f"--configs: no installed anchor {unknown}; these are: {' '.join(anchor_configs())}"
            )
    limits = Limits(
        steps=args.steps,
        min_steps=args.min_steps,
        warmup=args.warmup,
        cell_s=args.cell_s,
        max_step_s=args.max_step_s,
        max_mem_mb=args.max_mem_mb or _available_mb() / 2,
    )
    meta = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": _load(),
        "mtlkit": _mtlkit_revision(),
        "torch": torch.__version__,
        "torchjd": _version("torchjd"),
        "libmtl": _version("LibMTL"),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "core": core,
        "rounds": args.rounds,
        "limits": asdict(limits),
    }
    info = {c: config_info(c) for c in configs}
    preload(configs)
    raw = run(configs, args.ks, args.rounds, limits, core)
    meta["load_end"] = _load()
    return package(meta, info, raw)


def package(meta: dict, info: dict, raw: dict) -> dict:
    """What the report and the JSON hold: the run's facts, each configuration's description, the
    per-cell summary, mtlkit against its anchors, and the raw per-step timings."""
    summary = summarise(raw, info)
    versus = {
        c: {str(k): versus_anchors(raw, summary, c, k, meta["limits"]) for k in raw[c]}
        for c in info
        if info[c]["lib"] == "mtlkit"
    }
    return {"meta": meta, "configs": info, "summary": summary, "versus": versus, "raw": raw}


def load(path: Path) -> dict:
    """A saved run, summarised again from its raw timings by the current code."""
    saved = json.loads(path.read_text())
    raw = {c: {int(k): cell for k, cell in per_k.items()} for c, per_k in saved["raw"].items()}
    return package(saved["meta"], saved["configs"], raw)


def main() -> None:
    args = parse_args()
    data = load(args.from_json) if args.from_json else measure_all(args)
    text = report(data)
    print(text)
    if args.targets:
        print("\n".join(["", "Targets:", *target_lines(data)]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        if not args.from_json:
            args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
