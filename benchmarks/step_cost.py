"""Per-step time and peak memory of mtlkit methods relative to one plain summed-loss step.

Reference model: input 256, shared MLP trunk 256-512-512-256 with ReLU, K heads
256-64-1, MSE per task, batch 256, fixed random data, SGD. One step = forward + the method's
backward + optimizer.step(). Configurations:

- ``sum``      plain torch: ``sum(losses).backward()`` (the baseline of every ratio);
- ``floor``    plain torch: a loop of K ``torch.autograd.grad`` calls, one per task (the cost any
               parameter-level per-task-gradient method must pay);
- ``mtlkit:*`` mtlkit methods through ``method.backward`` (any registry name: ``mgda``, ``mgda_ub``,
               ``upgrad``, every loss weighting, ...; ``<name>-rep`` runs a gradient method at the
               representation level; ``mgda-f64``/``-loop``/``-batched`` pin the engine; a method
               with ``batches_per_step > 1`` gets fixed extra batches as ``extra_losses``);
- ``before:*`` the same methods from another mtlkit checkout given by ``--before SRC`` (its
               ``src`` folder), driven through that version's API, for before/after comparisons in
               one run: the old package is copied to a temporary folder as ``mtlkit_before`` (every
               ``mtlkit`` name in it renamed), so both versions load side by side, also in
               ``--in-process`` mode;
- ``torchjd:*`` / ``libmtl:*`` the anchors, when installed (``make bench`` installs TorchJD 0.18.0
               and LibMTL 1.1.5; every aggregator name and the LibMTL shims are in ``anchors.py``).

``aggregators.py`` runs every gradient method beside its anchors, up to K = 256, with these steps.
Schemes around a base method are named ``mtlkit:<scheme>+<base>`` (``fmtl+pcgrad``,
``rep_mtl+mgda_ub``); F-MTL gets the forward pass on the step's batch as its ``closure``.
``--model fusion`` replaces the first trunk layer by two modality branches meeting at a gradient
calibration (every configuration then runs on that model, so FULLER's ratio is like for like).

Every (configuration, K) runs in its own forked child (so peak RSS is its own), pinned to one
core with one intra-op thread; each K block is repeated in interleaved rounds so that load from
other processes hits every configuration alike. Cell = median step time over the timed steps of
all rounds; ratio = median over rounds of (config median / ``sum`` median in the same round).
Memory = the child's peak RSS minus its RSS just before the first step (dRSS).

usage: python benchmarks/step_cost.py [--ks 2 10 40] [--rounds 5] [--steps 20] [--out FILE.md]
       [--configs ...] [--before OLD_CHECKOUT/src] [--in-process] [--model mlp|fusion]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

IN, TRUNK, HEAD, BATCH = 256, (512, 512, 256), 64, 256
FUSION = os.environ.get("MTLKIT_STEP_COST_MODEL") == "fusion"  # set by --model (inherited by children)


class RefModel(nn.Module):
    """The reference MLP in mtlkit's multi-task model protocol. With ``fusion`` (``--model fusion``)
    the first layer is two modality branches (each half of the input to 256 units) meeting at a
    gradient calibration, so FULLER runs; every configuration then uses that model."""

    def __init__(self, k: int, fusion: bool = False) -> None:
        super().__init__()
        layers, width = [], IN
        self.branches = nn.ModuleList()
        self.calibration = None
        dims = TRUNK
        if fusion:
            from mtlkit.core.gradient_calibration import ModalityGradientCalibration

            half = IN // 2
            self.branches = nn.ModuleList([nn.Sequential(nn.Linear(half, 256), nn.ReLU()) for _ in range(2)])
            self.calibration = ModalityGradientCalibration()
            width, dims = 512, TRUNK[1:]
        for d in dims:
            layers += [nn.Linear(width, d), nn.ReLU()]
            width = d
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, HEAD), nn.ReLU(), nn.Linear(HEAD, 1)) for _ in range(k)]
        )
        self.names = [f"t{i}" for i in range(k)]
        self.last_features = None

    def forward(self, x, full_output=False):
        if self.calibration is not None:
            parts = self.calibration(*(b(p) for b, p in zip(self.branches, x.chunk(2, dim=1), strict=True)))
            x = torch.cat(parts, dim=1)
        z = self.trunk(x)
        self.last_features = z  # the representation as the `before:` configurations read it
        out = {n: h(z).squeeze(-1) for n, h in zip(self.names, self.heads, strict=True)}
        if full_output:
            from mtlkit import MultiTaskOutput

            return MultiTaskOutput(out, z)
        return out

    def shared_parameters(self):
        return list(self.branches.parameters()) + list(self.trunk.parameters())

    def task_parameters(self):
        return {n: list(h.parameters()) for n, h in zip(self.names, self.heads, strict=True)}

    def last_shared_parameters(self):
        return [self.trunk[-2].weight]  # the last shared Linear: GradNorm's layer W


def extra_batches(n: int, k: int, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` more fixed random batches (inputs, targets) of the step's shapes, for methods that use
    several independent batches per step; drawn from their own generator, so the step's own batch
    is the same as for every other configuration."""
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, IN, generator=gen).to(device), torch.randn(BATCH, k, generator=gen).to(device))
        for _ in range(n)
    ]


def make_step(config: str, k: int, device: str = "cpu") -> Callable[[], None]:
    """The training step of ``config`` at K tasks, on a fresh model (seed 0). Steps built from a
    method or an aggregator carry it as ``step.method`` / ``step.aggregator`` (for solver timing)."""
    torch.manual_seed(0)
    model = RefModel(k, fusion=FUSION).to(device)
    x = torch.randn(BATCH, IN, device=device)
    y = torch.randn(BATCH, k, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mse = nn.functional.mse_loss

    def losses_of(inputs, targets, out=None):
        out = model(inputs) if out is None else out
        return [mse(out[n], targets[:, i]) for i, n in enumerate(model.names)]

    def losses_list(out=None):
        return losses_of(x, y, out)

    if config in ("sum", "sum-again"):  # sum-again: the same step twice, to show the noise floor

        def step():
            opt.zero_grad(set_to_none=True)
            sum(losses_list()).backward()
            opt.step()

        return step
    if config == "floor":
        shared = model.shared_parameters()
        heads = model.task_parameters()

        def step():
            opt.zero_grad(set_to_none=True)
            losses = losses_list()
            for i, n in enumerate(model.names):
                params = shared + heads[n]
                grads = torch.autograd.grad(losses[i], params, retain_graph=i < k - 1)
                for p, g in zip(params, grads, strict=True):
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)
            opt.step()

        return step
    if config == "sum+fwd":  # FAMO's floor: a summed step plus one no-grad forward

        def step():
            opt.zero_grad(set_to_none=True)
            sum(losses_list()).backward()
            opt.step()
            with torch.no_grad():
                losses_list()

        return step
    if config == "sum+layer":  # GradNorm's floor: a summed step plus K VJPs to the last shared layer
        layer = model.last_shared_parameters()

        def step():
            opt.zero_grad(set_to_none=True)
            losses = losses_list()
            for loss in losses:
                torch.autograd.grad(loss, layer, retain_graph=True)
            sum(losses).backward()
            opt.step()

        return step
    lib, _, name = config.partition(":")
    if lib == "before":
        return _before_step(name, model, losses_list, opt)
    if lib == "torchjd" and name in TORCHJD_SCALARIZERS:
        return _torchjd_scalarizer_step(name, k, model, losses_list, opt)
    if lib == "mtlkit":
        return _mtlkit_step(name, model, (x, y), losses_of, opt)
    if lib == "torchjd":
        from anchors import TORCHJD_BATCHES, torchjd_step

        name = {"mgda": "MGDA", "mean": "Mean"}.get(name, name)  # the earlier lower-case names
        extra = extra_batches(TORCHJD_BATCHES.get(name, 1) - 1, k, device)
        return torchjd_step(name, model, losses_of, (x, y), extra, opt)
    if lib == "libmtl":
        from anchors import libmtl_step

        return libmtl_step(name, model, x, y, opt)
    raise SystemExit(f"unknown configuration {config!r}")


#: mtlkit loss weightings, with the options the benchmark uses (DWA/STCH reach their weighted phase
#: because the step ends an "epoch" every EPOCH_STEPS steps).
LOSS_WEIGHTINGS = {
    "si": {},
    "gls": {},
    "uw": {},
    "imtl_l": {},
    "dwa": {},
    "rlw": {"seed": 0},
    "stch": {"warmup_epochs": 0},
    "famo": {},
    "gradnorm": {},
}
TORCHJD_SCALARIZERS = ("uw", "dwa", "famo", "geometric_mean", "imtl_l", "random", "stch")
EPOCH_STEPS = 5


#: engine variants of MGDA, pinned for the strategy and precision comparisons
ENGINE_VARIANTS = {
    "mgda-f64": {"precision": "float64"},
    "mgda-batched": {"strategy": "batched"},
    "mgda-loop": {"strategy": "loop"},
}


def create_method(name: str):
    """The mtlkit method of configuration ``mtlkit:<name>``: a registry name (with the options in
    LOSS_WEIGHTINGS), an MGDA engine variant, or ``<registry name>-rep`` (the method at the
    representation level)."""
    import mtlkit as mk

    if name in ENGINE_VARIANTS:
        return mk.methods.MGDA(engine=mk.GradientEngine(**ENGINE_VARIANTS[name]))
    if "+" in name:  # a scheme around a base method: ``fmtl+pcgrad``, ``rep_mtl+mgda_ub``
        scheme, base_name = name.split("+", 1)
        return mk.methods.create(scheme, base=base_name)
    base = name.removesuffix("-rep")
    options = dict(LOSS_WEIGHTINGS.get(base, {}))
    if base != name:
        options["level"] = "representation"
    return mk.methods.create(base, **options)


def _mtlkit_step(name, model, batch, losses_of, opt) -> Callable[[], None]:
    """A step through the current API: backward(losses, model, output), with every lifecycle
    call the method declares (an epoch ends every EPOCH_STEPS steps); a method with
    ``batches_per_step > 1`` gets the other batches' losses as ``extra_losses``."""
    import mtlkit as mk

    method = create_method(name)
    method.setup(model.names, model=model)
    mk.methods.add_param_groups(opt, method.param_groups())
    after = mk.methods.Hook.AFTER_STEP in method.hooks
    epochs = mk.methods.Hook.EPOCH_END in method.hooks
    x, y = batch
    extra = extra_batches(method.batches_per_step - 1, len(model.names), x.device.type)
    counter = [0]
    method.begin_epoch()

    def named(inputs, targets, out):
        return dict(zip(model.names, losses_of(inputs, targets, out), strict=True))

    def again():  # F-MTL's forward passes at its perturbed weights
        return named(x, y, None), None

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x, full_output=True)
        losses = named(x, y, out.predictions)
        others = [named(xe, ye, model(xe)) for xe, ye in extra]
        method.backward(losses, model, out, extra_losses=others, closure=again)
        opt.step()
        if after:
            with torch.no_grad():
                method.after_step(losses_of(x, y))
        counter[0] += 1
        if epochs and counter[0] % EPOCH_STEPS == 0:
            method.on_epoch_end()
            method.begin_epoch()

    step.method = method  # type: ignore[attr-defined]
    return step


def _before_step(name, model, losses_list, opt) -> Callable[[], None]:
    """A step through the API of the checkout given by ``--before`` (the one before the
    method-contract redesign): string hooks, ``features=``/``task_specific=`` arguments."""
    import mtlkit_before as mk  # type: ignore[import-not-found]

    if name in ("ew", "mgda", "mgda_ub"):
        method = mk.methods.MGDA(level="representation") if name == "mgda_ub" else mk.methods.create(name)
        shared, heads = model.shared_parameters(), model.task_parameters()

        def step():
            opt.zero_grad(set_to_none=True)
            losses = dict(zip(model.names, losses_list(), strict=True))
            method.backward(losses, shared=shared, features=model.last_features, task_specific=heads)
            opt.step()

        return step
    method = mk.methods.create(name, **LOSS_WEIGHTINGS[name])
    method.setup(model.names, model=model)
    for group in method.param_groups():
        opt.add_param_group(group)
    shared = model.shared_parameters()
    counter = [0]

    def step():
        opt.zero_grad(set_to_none=True)
        losses = dict(zip(model.names, losses_list(), strict=True))
        method.backward(losses, shared=shared)
        opt.step()
        if "post_step_losses" in method.hooks:
            with torch.no_grad():
                method.after_step(losses_list())
        counter[0] += 1
        if "epoch_end" in method.hooks and counter[0] % EPOCH_STEPS == 0:
            method.on_epoch_end()

    return step


def _torchjd_scalarizer_step(name, k, model, losses_list, opt) -> Callable[[], None]:
    from torchjd import scalarization as sc

    scalarizer = {
        "uw": lambda: sc.UW(k),
        "dwa": lambda: sc.DWA(2.0),
        "famo": lambda: sc.FAMO(k),
        "geometric_mean": sc.GeometricMean,
        "imtl_l": lambda: sc.IMTLL(k),
        "random": sc.Random,
        "stch": lambda: sc.STCH(1.0),
    }[name]()
    extra = [p for p in scalarizer.parameters() if p.requires_grad and name in ("uw", "imtl_l")]
    if extra:
        opt.add_param_group({"params": extra, "weight_decay": 0.0})
    counter = [0]

    def step():
        opt.zero_grad(set_to_none=True)
        scalarizer(torch.stack(losses_list())).backward()
        opt.step()
        if name == "famo":
            with torch.no_grad():
                scalarizer.update(torch.stack(losses_list()))
        counter[0] += 1
        if name == "dwa" and counter[0] % EPOCH_STEPS == 0:
            scalarizer.step()

    return step


def available_configs() -> list[str]:
    configs = [
        "sum",
        "floor",
        "mtlkit:ew",
        "mtlkit:mgda",
        "mtlkit:mgda-f64",
        "mtlkit:mgda_ub",
        "mtlkit:upgrad",
    ]
    configs += ["sum+fwd", "sum+layer"] + [f"mtlkit:{m}" for m in LOSS_WEIGHTINGS]
    try:
        import torchjd  # noqa: F401

        configs += ["torchjd:mean", "torchjd:mgda"] + [f"torchjd:{m}" for m in TORCHJD_SCALARIZERS]
    except ImportError:
        pass
    from anchors import libmtl_available

    if libmtl_available():
        configs += ["libmtl:EW", "libmtl:MGDA", "libmtl:MGDA-rep"]
        configs += ["libmtl:UW", "libmtl:DWA", "libmtl:GLS", "libmtl:GradNorm"]
    return configs


def install_before(src: str) -> None:
    """Make the mtlkit package under ``src`` importable as ``mtlkit_before``."""
    import re
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="mtlkit_before_"))
    shutil.copytree(Path(src) / "mtlkit", root / "mtlkit_before")
    for path in (root / "mtlkit_before").rglob("*.py"):
        path.write_text(re.sub(r"\bmtlkit\b", "mtlkit_before", path.read_text()))
    sys.path.insert(0, str(root))


def _child(config: str, k: int, steps: int, warmup: int, core: int | None, conn) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    step = make_step(config, k)
    rss0 = _rss_mb()  # after building the model and data, before the first step
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    conn.send({"times": times, "drss": max(0.0, peak - rss0)})
    conn.close()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _time_steps(step: Callable[[], None], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(config: str, k: int, steps: int, warmup: int, core: int | None) -> dict:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(config, k, steps, warmup, core, child))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the last one)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--model",
        choices=("mlp", "fusion"),
        default="mlp",
        help="fusion: two modality branches at a gradient calibration in place of the first layer (FULLER)",
    )
    parser.add_argument(
        "--before", default=None, help="src folder of another mtlkit checkout (before:* configs)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="time every configuration in this one process (warm caches, no per-config fork; "
        "lower noise for small differences, no peak-memory figures)",
    )
    args = parser.parse_args()
    global FUSION
    FUSION = args.model == "fusion"
    os.environ["MTLKIT_STEP_COST_MODEL"] = args.model
    if args.before:
        install_before(args.before)
    elif any(c.startswith("before:") for c in (args.configs or [])):
        raise SystemExit("before:* configurations need --before OLD_CHECKOUT/src")
    os.environ["OMP_NUM_THREADS"] = "1"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    core = args.core if args.core is not None else (cores[-1] if cores else None)
    configs = args.configs or available_configs()
    results: dict[int, dict[str, dict]] = {}
    if args.in_process:  # one process: all configurations built once, rounds interleaved
        if core is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
    for k in args.ks:
        per_round: dict[str, list[dict]] = {c: [] for c in configs}
        steps = {c: make_step(c, k) for c in configs} if args.in_process else {}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        for r in range(args.rounds):
            for c in configs:
                if args.in_process:
                    per_round[c].append({"times": _time_steps(steps[c], args.steps), "drss": math.nan})
                else:
                    per_round[c].append(measure(c, k, args.steps, args.warmup, core))
                print(
                    f"K={k} round {r + 1} {c}: {1e3 * statistics.median(per_round[c][-1]['times']):.1f} ms",
                    file=sys.stderr,
                )
        results[k] = {}
        for c in configs:
            med = [statistics.median(x["times"]) for x in per_round[c]]
            base = [statistics.median(x["times"]) for x in per_round["sum"]]
            floor = (
                [statistics.median(x["times"]) for x in per_round["floor"]] if "floor" in per_round else base
            )
            results[k][c] = {
                "ms": 1e3 * statistics.median([t for x in per_round[c] for t in x["times"]]),
                "ratio": statistics.median(m / b for m, b in zip(med, base, strict=True)),
                "vs_floor": statistics.median(m / f for m, f in zip(med, floor, strict=True)),
                "drss_mb": max((x["drss"] for x in per_round[c]), default=math.nan),
            }
            for extra in ("sum+fwd", "sum+layer"):  # the floors of FAMO and GradNorm
                if extra in per_round:
                    ref = [statistics.median(x["times"]) for x in per_round[extra]]
                    results[k][c][f"vs:{extra}"] = statistics.median(
                        m / f for m, f in zip(med, ref, strict=True)
                    )
    text = report(results, args, configs)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps({str(k): v for k, v in results.items()}, indent=1)
        )


def report(results: dict[int, dict[str, dict]], args, configs: list[str]) -> str:
    ks = sorted(results)
    head = "| configuration | " + " | ".join(f"K={k} ms (x sum) [x floor]" for k in ks) + " |"
    lines = [head, "|---|" + "---|" * len(ks)]
    for c in configs:
        cells = [
            f"{results[k][c]['ms']:.1f} ({results[k][c]['ratio']:.2f}x) [{results[k][c]['vs_floor']:.2f}x]"
            for k in ks
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    mem = [
        "",
        "Peak memory above the pre-step RSS (dRSS, MB):",
        "",
        "| configuration | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for c in configs:
        mem.append(f"| {c} | " + " | ".join(f"{results[k][c]['drss_mb']:.0f}" for k in ks) + " |")
    if args.in_process:
        mem = ["", "(Peak memory is measured only with one forked process per cell, the default.)"]
    targets = ["", "Targets (ratio: median over rounds):", ""]
    checks = [
        ("mtlkit:ew", "ratio", "EW at 1.0x a summed-loss step (+-5% noise allowed)", 1.05),
        ("mtlkit:mgda", "vs_floor", "parameter-level MGDA within 1.1x of the K-backward floor", 1.1),
        ("mtlkit:mgda_ub", "ratio", "representation-level MGDA at most 3x a summed-loss step", 3.0),
    ]
    for name in LOSS_WEIGHTINGS:
        base = {"famo": "sum+fwd", "gradnorm": "sum+layer"}.get(name, "sum")
        what = {"sum": "a summed-loss step", "sum+fwd": "a summed step + one no-grad forward"}.get(
            base, "a summed step + K VJPs to the last shared layer"
        )
        key = "ratio" if base == "sum" else f"vs:{base}"
        checks.append((f"mtlkit:{name}", key, f"{name} at most 1.1x {what}", 1.1))
    for config, key, text, bound in checks:
        if config in configs and key in results[ks[0]][config]:
            got = [results[k][config][key] for k in ks]
            ok = all(g <= bound for g in got)
            cells = ", ".join(f"K={k}: {g:.2f}x" for k, g in zip(ks, got, strict=True))
            targets.append(f"- {text}: {cells} -> {'met' if ok else 'NOT met'}")
    env = (
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()} ({_cpu_model()}), "
        f"{os.cpu_count()} CPUs, 1 thread pinned to one core, {'one process, ' if args.in_process else 'one forked process per cell, '}"
        f"{args.rounds} interleaved rounds x {args.steps} steps "
        f"(after {args.warmup} warm-up steps), batch {BATCH}, trunk {IN}-{'-'.join(map(str, TRUNK))}, heads {TRUNK[-1]}-{HEAD}-1"
        + (
            " (fusion: the first layer is two 128-to-256 modality branches meeting at a gradient calibration)."
            if FUSION
            else "."
        )
    )
    return "\n".join(["# Step cost", "", env, "", *lines, *targets, *mem, ""])


if __name__ == "__main__":
    main()
