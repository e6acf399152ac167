"""Running a benchmark suite: single-task baselines first, then every method, each run stored once.

Layout under the suite's ``output`` folder::

    <dataset>/<architecture>/single_task/<task>/seed<k>/result.json   the stored baselines
    <dataset>/<architecture>/<method>/seed<k>/result.json             the multi-task runs
    .../seed<k>/steps.csv, epochs.csv, checkpoints/                   the Trainer's logs

A run is finished when its ``result.json`` exists and carries the run's fingerprint (a hash of
everything that defines it: dataset and protocol, architecture, method and options, seed, tasks).
Rerunning a suite skips finished runs, resumes an interrupted one from its last checkpoint (the
Trainer's exact resume), and reruns a run whose definition changed. Single-task baselines are
trained once per (dataset, architecture, seed, task) with the same protocol and the method ``ew``,
and every multi-task run of that (dataset, architecture, seed) is compared with them: Δm% on the
test split against their test metrics (Maninis et al., CVPR 2019; never against epoch 0 of the
same run), and per epoch on the validation split against their validation metrics.

Each result records the test and validation metrics, Δm%, the training wall time, the peak memory
the run added (resident memory on Linux, allocated memory on CUDA), and the epoch and step traces
(validation Δm% against seconds; task weights and gradient cosines where the method reports them).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import inspect
import json
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtlkit.bench.suite_config import (
    ComponentSpec,
    DatasetSpec,
    SuiteConfig,
    fingerprint,
    methods_for,
    run_config,
)
from mtlkit.train.callbacks import Callback
from mtlkit.version import __version__

BASELINE_METHOD = ComponentSpec("ew", label="single_task")
TRACE_POINTS = 60


@dataclass(frozen=True)
class Job:
    """One training run of a suite (picklable: it crosses into worker processes)."""

    kind: str  # "single_task" or "multi_task"
    dataset: DatasetSpec
    architecture: ComponentSpec
    method: ComponentSpec
    seed: int
    task: str | None
    directory: str
    threads: int
    device: str
    log_every: int
    val_reference: dict[str, dict[str, float]] | None = None
    test_reference: dict[str, dict[str, float]] | None = None

    @property
    def key(self) -> str:
        what = f"single_task/{self.task}" if self.task else self.method.title
        return f"{self.dataset.title}/{self.architecture.title}/{what}/seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        return fingerprint(
            {
                "dataset": dataclasses.asdict(self.dataset),
                "architecture": dataclasses.asdict(self.architecture),
                "method": dataclasses.asdict(self.method),
                "seed": self.seed,
                "task": self.task,
                "log_every": self.log_every,
            }
        )


def run_directory(output: Path, dataset: DatasetSpec, arch: ComponentSpec, what: str, seed: int) -> Path:
    return output / _slug(dataset.title) / _slug(arch.title) / what / f"seed{seed}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def read_result(directory: Path, expected: str | None = None) -> dict[str, Any] | None:
    """A finished run's result (``None`` when absent, unreadable, or made for another definition)."""
    path = Path(directory) / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if expected is not None and result.get("fingerprint") != expected:
        return None
    return dict(result)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


# -- measuring ---------------------------------------------------------------------------------------
class EpochClock(Callback):
    """Adds ``seconds`` (training wall time so far, across resumes) to each epoch's logged row."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._start = 0.0

    def on_fit_start(self, trainer: Any) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, trainer: Any, epoch: int, row: dict[str, float], report: Any) -> None:
        now = time.perf_counter()
        self.elapsed += now - self._start
        self._start = now
        row["seconds"] = self.elapsed

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.elapsed = float(state.get("elapsed", 0.0))


class PeakMemory:
    """Peak memory a block of code adds: allocated CUDA memory on a CUDA device, else resident
    memory from ``/proc/self`` (Linux); ``None`` where neither can be read."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.base: float | None = None
        self.peak_mib: float | None = None

    def reset(self) -> None:
        """Start measuring from the current usage."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = float(torch.cuda.memory_allocated())
            return
        _release_free_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
            self.base = _proc_status("VmRSS")
        except OSError:
            self.base = None

    def read(self) -> None:
        """Fold the peak since the last :meth:`reset` into :attr:`peak_mib`."""
        if self.base is None:
            return
        peak = float(torch.cuda.max_memory_allocated()) if self.cuda else _proc_status("VmHWM")
        self.peak_mib = max(self.peak_mib or 0.0, max(0.0, peak - self.base) / 2**20)

    def __enter__(self) -> PeakMemory:
        self.reset()
        return self

    def __exit__(self, *exc: object) -> None:
        self.read()


class StepMemory(Callback):
    """The peak memory of the training steps alone (validation excluded): measured from the start
    of each epoch to its last step, the largest over epochs."""

    def __init__(self, device: str) -> None:
        self.meter = PeakMemory(device)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.meter.reset()

    def on_step_end(self, trainer: Any, info: Any) -> None:
        self.meter.read()


def _release_free_memory() -> None:
    """Return the allocator's free memory to the system (glibc's ``malloc_trim``), so that the
    measurement starts from what is live; the allocator keeps its default (fast) settings."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) * 1024  # reported in KiB
    raise OSError(f"/proc/self/status has no {key}")


# -- one run ------------------------------------------------------------------------------------------
def load_dataset(spec: DatasetSpec, seed: int) -> Any:
    """The dataset of ``spec`` for ``seed`` (its split seed, where the loader takes one), with the
    training split cut to a seeded subset of ``train_size`` rows when asked."""
    from mtlkit import data as mk_data

    options = dict(spec.options)
    factory = mk_data.DATASETS.get(spec.name)
    if "seed" in inspect.signature(factory).parameters and "seed" not in options:
        options["seed"] = seed
    return mk_data.seeded_subset(mk_data.load(spec.name, **options), spec.train_size, seed)


def execute(job: Job) -> dict[str, Any]:
    """Run ``job`` unless its result is stored; returns the result (or ``{"error": ...}``)."""
    directory = Path(job.directory)
    done = read_result(directory, job.fingerprint)
    if done is not None:
        done["reused"] = True
        return done
    torch.set_num_threads(job.threads)
    try:
        if job.kind == "multi_task" and job.test_reference is None:
            raise RuntimeError(
                "not run: a single-task baseline of this dataset, architecture and seed is missing or "
                "failed (see its error); the next run of the suite retries it"
            )
        result = _train(job, directory)
    except Exception as exc:  # one failed run must not stop a suite; its error is reported
        failure = {
            "key": job.key,
            "fingerprint": job.fingerprint,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
        }
        write_json_atomic(directory / "failed.json", failure)
        return failure
    write_json_atomic(directory / "result.json", result)
    (directory / "failed.json").unlink(missing_ok=True)
    return result


def _train(job: Job, directory: Path) -> dict[str, Any]:
    from mtlkit.train.evaluate import EvaluationReport
    from mtlkit.train.experiment import run

    dataset = load_dataset(job.dataset, job.seed)
    cfg = run_config(
        job.dataset, job.architecture, job.method, job.seed, directory, job.device, job.log_every
    )
    tasks = [job.task] if job.task else list(dataset.tasks.names)
    if job.val_reference is not None:
        reference = EvaluationReport(
            metrics={t: dict(job.val_reference[t]) for t in tasks},
            directions={t: dict(v) for t, v in _directions(dataset, tasks).items()},
        )
        reference.save(directory / "reference_val.json")
        cfg.reference = str(directory / "reference_val.json")
    elif cfg.trainer.early_stopping is not None:  # best_val without Δm%: a baseline's own metric
        main = next(iter(_directions(dataset, tasks)[job.task])) if job.task else None
        cfg.trainer.early_stopping.monitor = f"{job.task}/{main}" if main else "loss"
    clock, steps = EpochClock(), StepMemory(job.device)
    _warm_up(job)
    with PeakMemory(job.device) as memory:
        outcome = run(cfg, dataset, task_names=[job.task] if job.task else None, callbacks=[clock, steps])
    result: dict[str, Any] = {
        "key": job.key,
        "fingerprint": job.fingerprint,
        "kind": job.kind,
        "dataset": job.dataset.title,
        "architecture": job.architecture.title,
        "method": job.method.title,
        "method_name": job.method.name,
        "method_options": job.method.options,
        "seed": job.seed,
        "task": job.task,
        "tasks": tasks,
        "directions": _directions(dataset, tasks),
        "test": outcome.test.metrics,
        "val": _selected_validation(outcome.trainer, _directions(dataset, tasks)),
        "seconds": clock.elapsed,
        "peak_memory_mib": steps.meter.peak_mib,
        "run_peak_memory_mib": memory.peak_mib,
        "steps": outcome.trainer.step,
        "train_size": len(dataset.train),
        "threads": job.threads,
        "epochs": _epoch_trace(outcome.trainer.history),
        "trace": _step_trace(directory / "steps.csv"),
        "mtlkit": __version__,
        "torch": torch.__version__,
    }
    if job.test_reference is not None:
        report = EvaluationReport(metrics=outcome.test.metrics, directions=result["directions"])
        report.with_reference(job.test_reference)
        result["delta_m"] = report.delta_m
        result["per_task_delta"] = report.per_task_delta
    return result


def _warm_up(job: Job) -> None:
    """Import what the run imports on first use (scikit-learn's metrics, the method's solver), so
    that the peak memory measured is the run's, not the libraries'."""
    import sklearn.metrics  # noqa: F401

    from mtlkit import methods as mk_methods

    mk_methods.create(job.method.name, **job.method.options)


def _directions(dataset: Any, tasks: Sequence[str]) -> dict[str, dict[str, bool]]:
    from mtlkit.metrics.task_metrics import directions

    return {t: d for t, d in directions(dataset.tasks).items() if t in tasks}


def _selected_validation(
    trainer: Any, directions: Mapping[str, Mapping[str, bool]]
) -> dict[str, dict[str, float]]:
    """The validation metrics of the model the run ends with, read from the Trainer's history: the
    best epoch's where early stopping restored it, else the last epoch's (no second evaluation)."""
    best = trainer.early_stopping.best_epoch if trainer.early_stopping is not None else None
    row = trainer.history[(best or len(trainer.history)) - 1]
    return {t: {m: row[f"val/{t}/{m}"] for m in names} for t, names in directions.items()}


def _epoch_trace(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [
        {"epoch": i + 1, **{k: v for k, v in row.items() if k == "seconds" or k.startswith("val/")}}
        for i, row in enumerate(history)
    ]


def _step_trace(path: Path) -> dict[str, list[float]]:
    """Task weights and gradient cosines over training from ``steps.csv``, thinned to at most
    :data:`TRACE_POINTS` rows (for 3+ tasks the cosines are averaged over pairs)."""
    import csv

    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    stride = max(1, -(-len(rows) // TRACE_POINTS))
    rows = rows[stride - 1 :: stride]
    weights = [k for k in rows[0] if k.startswith("weight/")]
    cosines = [k for k in rows[0] if k.startswith("cosine/")]

    def values(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    out = {"step": values("step")}
    out.update({k: values(k) for k in weights})
    if len(cosines) == 1:
        out[cosines[0]] = values(cosines[0])
    elif cosines:
        columns = [values(k) for k in cosines]
        out["cosine/mean"] = [sum(c) / len(c) for c in zip(*columns, strict=True)]
    return out


# -- planning and running the suite ------------------------------------------------------------------
def baseline_jobs(suite: SuiteConfig, task_names: Mapping[str, Sequence[str]]) -> list[Job]:
    """The single-task runs: every (dataset, architecture, seed, task)."""
    out = Path(suite.output)
    return [
        Job(
            "single_task",
            d,
            a,
            BASELINE_METHOD,
            seed,
            task,
            str(run_directory(out, d, a, f"single_task/{_slug(task)}", seed)),
            suite.threads,
            suite.device,
            suite.log_every,
        )
        for d in suite.datasets
        for a in d.architectures
        for seed in suite.seeds
        for task in task_names[d.title]
    ]


def method_jobs(
    suite: SuiteConfig, baselines: Mapping[str, dict[str, Any]], task_names: Mapping[str, Sequence[str]]
) -> list[Job]:
    """The multi-task runs, each with the validation and test metrics of its baselines (``None``
    when one of them is missing: the run is then reported as not run)."""
    out = Path(suite.output)
    jobs = []
    for d in suite.datasets:
        for a in d.architectures:
            for seed in suite.seeds:
                ref = reference_of(baselines, d.title, a.title, seed, task_names[d.title])
                for m in methods_for(suite, d):
                    jobs.append(
                        Job(
                            "multi_task",
                            d,
                            a,
                            m,
                            seed,
                            None,
                            str(run_directory(out, d, a, _slug(m.title), seed)),
                            suite.threads,
                            suite.device,
                            suite.log_every,
                            ref["val"] if ref else None,
                            ref["test"] if ref else None,
                        )
                    )
    return jobs


def reference_of(
    results: Mapping[str, dict[str, Any]],
    dataset: str,
    architecture: str,
    seed: int,
    tasks: Sequence[str],
) -> dict[str, dict[str, dict[str, float]]] | None:
    """``{"val": ..., "test": ...}`` metrics of the single-task baselines of (dataset,
    architecture, seed), or ``None`` unless every task in ``tasks`` has one."""
    found = [
        r
        for r in results.values()
        if r.get("kind") == "single_task"
        and (r["dataset"], r["architecture"], r["seed"]) == (dataset, architecture, seed)
    ]
    if not found:
        return None
    merged: dict[str, dict[str, dict[str, float]]] = {"val": {}, "test": {}}
    for r in found:
        for split in ("val", "test"):
            merged[split].update(r[split])
    if any(t not in merged["test"] for t in tasks):
        return None
    return merged


def suite_tasks(suite: SuiteConfig) -> dict[str, list[str]]:
    """Each dataset's task names (loads each dataset once, for the first seed)."""
    return {d.title: list(load_dataset(d, suite.seeds[0]).tasks.names) for d in suite.datasets}


def run_jobs(
    jobs: Sequence[Job], workers: int, log: Callable[[str], None] = print
) -> Iterator[dict[str, Any]]:
    """Execute ``jobs`` (in ``workers`` spawned processes, one run per process so that peak memory
    is the run's own; in this process when ``workers == 1``), yielding results as they finish."""
    total = len(jobs)
    if workers == 1:
        results: Iterator[dict[str, Any]] = map(execute, jobs)
        yield from _logged(results, total, log)
        return
    context = mp.get_context("spawn")
    with context.Pool(workers, maxtasksperchild=1) as pool:
        yield from _logged(pool.imap_unordered(execute, jobs, chunksize=1), total, log)


def _logged(
    results: Iterator[dict[str, Any]], total: int, log: Callable[[str], None]
) -> Iterator[dict[str, Any]]:
    for i, result in enumerate(results, 1):
        if "error" in result:
            status = f"FAILED {result['error']}"
        elif result.get("reused"):
            status = "stored"
        else:
            status = f"{result['seconds']:.1f} s"
        log(f"[{i}/{total}] {result['key']}: {status}")
        yield result


def run_suite(
    suite: SuiteConfig, workers: int | None = None, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """Run (or resume) every baseline, then every method; returns all results by key."""
    workers = workers or suite.workers
    os.environ.setdefault("OMP_NUM_THREADS", str(suite.threads))  # inherited by spawned workers
    results: dict[str, dict[str, Any]] = {}
    tasks = suite_tasks(suite)
    for r in run_jobs(baseline_jobs(suite, tasks), workers, log):
        results[r["key"]] = r
    ok = {k: r for k, r in results.items() if "error" not in r}
    for r in run_jobs(method_jobs(suite, ok, tasks), workers, log):
        results[r["key"]] = r
    return results


def collect_results(suite: SuiteConfig) -> dict[str, dict[str, Any]]:
    """The stored results and failures of the suite's runs (for reports without running); runs of
    other suites sharing the output folder are left out."""
    mine = _planned_prefixes(suite)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(suite.output).rglob("result.json")):
        r = read_result(path.parent)
        if r is not None and r.get("key", "").startswith(mine):
            out[r["key"]] = r
    for path in sorted(Path(suite.output).rglob("failed.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if r.get("key", "").startswith(mine):
            out.setdefault(r["key"], r)
    return out


def _planned_prefixes(suite: SuiteConfig) -> tuple[str, ...]:
    out = []
    for d in suite.datasets:
        for a in d.architectures:
            out.append(f"{d.title}/{a.title}/single_task/")
            out += [f"{d.title}/{a.title}/{m.title}/" for m in methods_for(suite, d)]
    return tuple(out)
