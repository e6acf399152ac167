"""The classical multi-task estimators against scikit-learn's single-task and pooled models.

**R-MTGB on ILEA Exam** (4,059 pupils, 65 schools as regression tasks, mtlkit's per-school
60/20/20 split, ``--seeds`` splits): R-MTGB against gradient boosting pooled over the schools,
pooled with the school one-hot encoded as features ("task as feature"), and one model per school;
every model's size chosen on the validation split (R-MTGB: ``n_iter_1st`` in 50/100/200 and
``n_iter_3rd`` in 0/10/50 with ``n_iter_2nd`` 100; the others: 50/100/200/400 trees), then scored
on the test split. Depth 3, learning rate 0.1 everywhere. Also the linear references: MTLComb-CV
(group lasso across schools) and one pooled linear regression. Test MSE over all test pupils.

**MTLComb's joint selection** (its tutorial simulation: 10 regression and 10 classification tasks,
200 features of which the last 20 are relevant, 100 training and 100 test samples per task):
MTLComb-CV against one LassoCV per regression task and one l1 LogisticRegressionCV per
classification task, with separate inputs per task; and, with one input matrix shared by the
tasks, against MultiTaskLassoCV on all twenty targets (the labels as numbers). Selected features:
the union over tasks; precision and recall against the true 20.

**TFCL's blocks** (two feature-task blocks: 20 features, 6 tasks, 40 samples per task, noise sd 1;
200 test samples per task from the same coefficients): TFCL (``gamma`` chosen on a validation set
from 1/3/10/20/30) against per-task ridge (TFCL's start) and MTLComb-CV. Off-block mass: the share
of ``|W|`` outside the true blocks.

**Speed** (one thread; interleaved rounds): R-MTGB beside scikit-learn's GradientBoostingRegressor
with the same number of trees on ILEA Exam, and MTLComb's 10-penalty path beside MultiTaskLasso's
10-penalty path (``lasso_path``-style warm starts) on the shared-input problem.

    python benchmarks/estimators.py --seeds 0 1 2 3 4 --out benchmarks/results/estimators.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import (
    LassoCV,
    LinearRegression,
    LogisticRegressionCV,
    MultiTaskLasso,
    MultiTaskLassoCV,
)
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from mtlkit.data import load_ilea_exam
from mtlkit.estimators import TFCL, MTLComb, MTLCombCV, RMTGBRegressor, block_task_problem, stack_tasks

Array = np.ndarray


def exam_arrays(seed: int) -> dict[str, tuple[Array, Array]]:
    """ILEA Exam's splits as ``X`` (features, then the school's index) and ``y``."""
    data = load_ilea_exam(seed)
    names = list(data.tasks.names)
    out = {}
    for split in ("train", "val", "test"):
        dataset = getattr(data, split)
        features = dataset.inputs.numpy().astype(np.float64)
        targets = np.stack([dataset.targets[t].numpy() for t in names], axis=1)
        school = np.argmax(~np.isnan(targets), axis=1)
        y = targets[np.arange(len(targets)), school].astype(np.float64)
        out[split] = (np.column_stack([features, school]), y)
    return out


def mse(y: Array, p: Array) -> float:
    return float(np.mean((y - p) ** 2))


def best_on_validation(
    candidates: list[dict[str, Any]], make: Callable[..., Any], train, val
) -> tuple[Any, dict]:
    scored = []
    for options in candidates:
        model = make(**options).fit(*train)
        scored.append((mse(val[1], model.predict(val[0])), options, model))
    _, options, model = min(scored, key=lambda s: s[0])
    return model, options


class OneHotTask:
    """Gradient boosting on the features plus the task one-hot ("task as feature")."""

    def __init__(self, tasks: int, **options: Any) -> None:
        self.tasks, self.model = tasks, GradientBoostingRegressor(**options)

    def _x(self, x: Array) -> Array:
        return np.column_stack([x[:, :-1], np.eye(self.tasks)[x[:, -1].astype(int)]])

    def fit(self, x: Array, y: Array) -> OneHotTask:
        self.model.fit(self._x(x), y)
        return self

    def predict(self, x: Array) -> Array:
        return self.model.predict(self._x(x))


class Pooled:
    """One model for every task: the task column dropped."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def fit(self, x: Array, y: Array) -> Pooled:
        self.model.fit(x[:, :-1], y)
        return self

    def predict(self, x: Array) -> Array:
        return self.model.predict(x[:, :-1])


class PerTask:
    """One model per task (a task without training rows predicts the pooled mean)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory, self.models = factory, {}

    def fit(self, x: Array, y: Array) -> PerTask:
        self.mean = float(y.mean())
        for t in np.unique(x[:, -1]):
            rows = x[:, -1] == t
            self.models[t] = self.factory().fit(x[rows, :-1], y[rows])
        return self

    def predict(self, x: Array) -> Array:
        out = np.full(len(x), self.mean)
        for t, model in self.models.items():
            rows = x[:, -1] == t
            if rows.any():
                out[rows] = model.predict(x[rows, :-1])
        return out


def exam_seed(seed: int) -> dict[str, Any]:
    s = exam_arrays(seed)
    train, val, test = s["train"], s["val"], s["test"]
    tasks = int(train[0][:, -1].max()) + 1
    rows: dict[str, Any] = {}
    gb = {"learning_rate": 0.1, "max_depth": 3, "random_state": seed}
    sizes = [{"n_estimators": n} for n in (50, 100, 200, 400)]

    def run(label: str, fit: Callable[[], tuple[Any, dict]]) -> None:
        start = time.perf_counter()
        model, options = fit()
        rows[label] = {
            "mse": mse(test[1], model.predict(test[0])),
            "seconds": time.perf_counter() - start,
            "chosen": options,
        }
        if isinstance(model, RMTGBRegressor):
            rows[label]["outlier_tasks"] = len(model.outlier_tasks_)

    run(
        "R-MTGB",
        lambda: best_on_validation(
            [{"n_iter_1st": a, "n_iter_3rd": c} for a in (50, 100, 200) for c in (0, 10, 50)],
            lambda **o: RMTGBRegressor(random_state=seed, **o),
            train,
            val,
        ),
    )
    run(
        "pooled gradient boosting",
        lambda: best_on_validation(
            sizes, lambda **o: Pooled(GradientBoostingRegressor(**gb, **o)), train, val
        ),
    )
    run(
        "pooled, school one-hot as features",
        lambda: best_on_validation(sizes, lambda **o: OneHotTask(tasks, **gb, **o), train, val),
    )
    run(
        "one gradient boosting per school",
        lambda: best_on_validation(
            sizes, lambda **o: PerTask(lambda: GradientBoostingRegressor(**gb, **o)), train, val
        ),
    )
    run("MTLComb-CV (linear, group lasso)", lambda: (MTLCombCV(random_state=seed).fit(*train), {}))
    run("pooled linear regression", lambda: (Pooled(LinearRegression()).fit(*train), {}))
    rows["_variance"] = float(np.var(test[1]))
    return rows


def selection_problem(seed: int, shared: bool) -> dict[str, Any]:
    """The tutorial simulation split into training and test halves per task."""
    rng = np.random.default_rng(seed)
    p, relevant, n = 200, 20, 100
    weights = np.zeros((p, 20))
    weights[p - relevant :] = rng.standard_normal((relevant, 20))
    common = rng.standard_normal((2 * n, p))
    parts = {"train": [], "test": []}
    for t in range(20):
        x = common if shared else rng.standard_normal((2 * n, p))
        y = x @ weights[:, t] + 0.5 * rng.standard_normal(2 * n)
        if t >= 10:
            y = np.sign(y)
        parts["train"].append((x[:n], y[:n]))
        parts["test"].append((x[n:], y[n:]))
    return {"parts": parts, "truth": set(range(p - relevant, p)), "classification": tuple(range(10, 20))}


def task_metrics(coefs: Array, intercepts: Array, test: list[tuple[Array, Array]]) -> tuple[float, float]:
    errors, aucs = [], []
    for t, (x, y) in enumerate(test):
        margin = x @ coefs[t] + intercepts[t]
        if t < 10:
            errors.append(mse(y, margin))
        else:
            aucs.append(roc_auc_score(y, margin))
    return float(np.mean(errors)), float(np.mean(aucs))


def selection_seed(seed: int) -> dict[str, Any]:
    rows = {}
    for shared in (False, True):
        problem = selection_problem(seed, shared)
        train, test, truth = problem["parts"]["train"], problem["parts"]["test"], problem["truth"]
        tag = "shared inputs" if shared else "separate inputs"

        def record(
            label: str,
            coefs: Array,
            intercepts: Array,
            seconds: float,
            tag: str = tag,
            test=test,
            truth=truth,
        ) -> None:
            chosen = set(np.flatnonzero(np.abs(coefs).sum(0) > 1e-10).tolist())
            error, auc = task_metrics(coefs, intercepts, test)
            rows[f"{label} ({tag})"] = {
                "selected": len(chosen),
                "precision": len(chosen & truth) / max(len(chosen), 1),
                "recall": len(chosen & truth) / len(truth),
                "mse": error,
                "auc": auc,
                "seconds": seconds,
            }

        x, y = stack_tasks(train)
        start = time.perf_counter()
        model = MTLCombCV(classification_tasks=problem["classification"], random_state=seed).fit(x, y)
        record("MTLComb-CV", model.coef_, model.intercept_, time.perf_counter() - start)
        start = time.perf_counter()
        coefs, intercepts = [], []
        for t, (xt, yt) in enumerate(train):
            if t < 10:
                m = LassoCV(cv=10, random_state=seed).fit(xt, yt)
                coefs.append(m.coef_)
                intercepts.append(m.intercept_)
            else:
                m = LogisticRegressionCV(
                    Cs=10, cv=10, l1_ratios=(1.0,), solver="liblinear", random_state=seed
                ).fit(xt, yt)
                coefs.append(m.coef_[0])
                intercepts.append(m.intercept_[0])
        record(
            "per-task LassoCV / l1 LogisticRegressionCV",
            np.array(coefs),
            np.array(intercepts),
            time.perf_counter() - start,
        )
        if shared:
            start = time.perf_counter()
            m = MultiTaskLassoCV(cv=10, random_state=seed).fit(
                train[0][0], np.column_stack([yt for _, yt in train])
            )
            record("MultiTaskLassoCV (labels as numbers)", m.coef_, m.intercept_, time.perf_counter() - start)
    return rows


def off_block(coef: Array, mask: Array) -> float:
    mass = np.abs(coef.T)
    return float(mass[~mask].sum() / mass.sum())


def tfcl_seed(seed: int) -> dict[str, Any]:
    x, y, weights, mask = block_task_problem(seed=seed)
    rng = np.random.default_rng(1000 + seed)

    def fresh(n: int) -> tuple[Array, Array]:
        tasks = []
        for t in range(weights.shape[1]):
            xt = rng.standard_normal((n, weights.shape[0]))
            tasks.append((xt, xt @ weights[:, t] + rng.standard_normal(n)))
        return stack_tasks(tasks)

    val, test = fresh(40), fresh(200)
    rows = {}

    def record(label: str, model: Any, seconds: float, extra: dict | None = None) -> None:
        rows[label] = {
            "off_block": off_block(model.coef_, mask),
            "coef_error": float(np.abs(model.coef_.T - weights).mean()),
            "mse": mse(test[1], model.predict(test[0])),
            "seconds": seconds,
            **(extra or {}),
        }

    start = time.perf_counter()
    model, chosen = best_on_validation(
        [{"gamma": g} for g in (1.0, 3.0, 10.0, 20.0, 30.0)], TFCL, (x, y), val
    )
    record(
        "TFCL (gamma on validation)",
        model,
        time.perf_counter() - start,
        {"gamma": chosen["gamma"], "blocks": len(model.blocks_)},
    )
    start = time.perf_counter()
    record("per-task ridge (TFCL's start)", TFCL(gamma=0.0).fit(x, y), time.perf_counter() - start)
    start = time.perf_counter()
    record("MTLComb-CV (group lasso)", MTLCombCV(random_state=seed).fit(x, y), time.perf_counter() - start)
    return rows


def speed(rounds: int) -> dict[str, Any]:
    s = exam_arrays(0)
    x, y = s["train"]
    problem = selection_problem(0, shared=True)
    xs, ys = stack_tasks(problem["parts"]["train"])
    shared_x = problem["parts"]["train"][0][0]
    targets = np.column_stack([yt for _, yt in problem["parts"]["train"]])
    mtl = MTLComb(classification_tasks=problem["classification"], max_iter=20, tol=0.01).fit(xs, ys)
    lambdas = mtl.lambdas_
    # scikit-learn's entry point for MultiTaskLasso: max_j ||X_j^T (Y - mean Y)||_2 / n
    alpha_max = np.sqrt(((shared_x.T @ (targets - targets.mean(0)) / len(targets)) ** 2).sum(1)).max()

    def rmtgb() -> None:
        RMTGBRegressor(n_iter_1st=100, n_iter_2nd=100, n_iter_3rd=50, random_state=0).fit(x, y)

    def sklearn_gb() -> None:  # the same number of trees: 100 + 2 x 100 on the pooled data, 50 per school
        GradientBoostingRegressor(n_estimators=300, max_depth=3, random_state=0).fit(x[:, :-1], y)
        for t in np.unique(x[:, -1]):
            rows = x[:, -1] == t
            GradientBoostingRegressor(n_estimators=50, max_depth=3, random_state=0).fit(x[rows, :-1], y[rows])

    def mtlcomb_path() -> None:
        MTLComb(classification_tasks=problem["classification"]).fit(xs, ys)

    def multitask_lasso_path() -> None:
        model = MultiTaskLasso(warm_start=True, max_iter=1000)
        for alpha in np.exp(np.linspace(np.log(alpha_max), np.log(0.01 * alpha_max), 10)):
            model.set_params(alpha=alpha).fit(shared_x, targets)

    calls = {
        "R-MTGB (100/100/50)": rmtgb,
        "sklearn GB, same trees": sklearn_gb,
        "MTLComb path (10 penalties)": mtlcomb_path,
        "MultiTaskLasso path (10 penalties)": multitask_lasso_path,
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds + 1):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            if r:
                times[label].append(time.perf_counter() - start)
    return {"times": times, "lambdas": len(lambdas)}


def mean_sd(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def table_rows(seeds: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """One table row per model: each column's mean ± sd over the seeds."""
    rows = []
    for label in seeds[0]:
        cells = [mean_sd([s[label][key] for s in seeds], fmt) for key, fmt in columns]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def report(exam: list[dict], selection: list[dict], tfcl: list[dict], timing: dict, command: str) -> str:
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    n = len(exam)
    lines = [
        "# Classical multi-task estimators",
        "",
        f"`{command}` · scikit-learn {sklearn.__version__}, numpy {np.__version__}, {platform.machine()}, "
        f"one thread, load average at the end {load}. Mean ± sd over {n} seeds; settings in the script's docstring.",
        "",
        "## R-MTGB on ILEA Exam (65 schools)",
        "",
        "| model | test MSE | explained variance | fit s (with the validation search) |",
        "|---|---:|---:|---:|",
    ]
    for label in [k for k in exam[0] if not k.startswith("_")]:
        values = [s[label]["mse"] for s in exam]
        explained = [1 - s[label]["mse"] / s["_variance"] for s in exam]
        lines.append(
            f"| {label} | {mean_sd(values, '.4f')} | {mean_sd(explained, '.3f')} | {mean_sd([s[label]['seconds'] for s in exam], '.1f')} |"
        )
    chosen = [s["R-MTGB"]["chosen"] for s in exam]
    outliers = [s["R-MTGB"]["outlier_tasks"] for s in exam]
    lines += [
        "",
        f"R-MTGB's validation choices (n_iter_1st, n_iter_3rd): {[(c['n_iter_1st'], c['n_iter_3rd']) for c in chosen]}; schools on the outlier side: {outliers}.",
    ]
    lines += [
        "",
        "## MTLComb's joint feature selection (tutorial simulation)",
        "",
        "| model | features selected | precision | recall | regression test MSE | classification test AUC | fit s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += table_rows(
        selection,
        [
            ("selected", ".1f"),
            ("precision", ".3f"),
            ("recall", ".3f"),
            ("mse", ".3f"),
            ("auc", ".3f"),
            ("seconds", ".2f"),
        ],
    )
    lines += [
        "",
        "## TFCL's feature-task blocks",
        "",
        "| model | off-block mass | mean abs coefficient error | test MSE | fit s |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += table_rows(
        tfcl, [("off_block", ".3f"), ("coef_error", ".3f"), ("mse", ".3f"), ("seconds", ".2f")]
    )
    gammas = [s["TFCL (gamma on validation)"]["gamma"] for s in tfcl]
    blocks = [s["TFCL (gamma on validation)"]["blocks"] for s in tfcl]
    lines += ["", f"TFCL's chosen gamma: {gammas}; components holding a task: {blocks}."]
    t = timing["times"]
    med = {k: statistics.median(v) for k, v in t.items()}
    lines += [
        "",
        "## Speed (median of the rounds, seconds)",
        "",
        "| fit | median s | range | ratio |",
        "|---|---:|---:|---:|",
        f"| R-MTGB (100/100/50) on ILEA Exam's training split | {med['R-MTGB (100/100/50)']:.2f} | {min(t['R-MTGB (100/100/50)']):.2f}-{max(t['R-MTGB (100/100/50)']):.2f} | {med['R-MTGB (100/100/50)'] / med['sklearn GB, same trees']:.2f} x sklearn |",
        f"| scikit-learn GradientBoostingRegressor, the same trees | {med['sklearn GB, same trees']:.2f} | {min(t['sklearn GB, same trees']):.2f}-{max(t['sklearn GB, same trees']):.2f} | 1 |",
        f"| MTLComb path, 10 penalties, 20 tasks x 100 samples x 200 features | {med['MTLComb path (10 penalties)']:.3f} | {min(t['MTLComb path (10 penalties)']):.3f}-{max(t['MTLComb path (10 penalties)']):.3f} | {med['MTLComb path (10 penalties)'] / med['MultiTaskLasso path (10 penalties)']:.2f} x MultiTaskLasso |",
        f"| scikit-learn MultiTaskLasso path, 10 penalties, the shared inputs | {med['MultiTaskLasso path (10 penalties)']:.3f} | {min(t['MultiTaskLasso path (10 penalties)']):.3f}-{max(t['MultiTaskLasso path (10 penalties)']):.3f} | 1 |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/estimators.md")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        choices=list(SECTIONS),
        help="rerun only these; the others are read from the output's JSON",
    )
    args = parser.parse_args()
    threadpool_limits(1)
    out = Path(args.out)
    stored = out.with_suffix(".json")
    results = json.loads(stored.read_text()) if stored.exists() else {}
    for section in args.sections:
        results[section] = SECTIONS[section](args)
        stored.write_text(json.dumps(results, indent=1, default=str))
        print(f"{section} done", flush=True)
    missing = [s for s in SECTIONS if s not in results]
    if missing:
        raise SystemExit(f"no results yet for {missing}: run them with --sections")
    command = "python benchmarks/estimators.py --seeds " + " ".join(map(str, args.seeds))
    out.write_text(report(results["exam"], results["selection"], results["tfcl"], results["speed"], command))
    print(out.read_text())


SECTIONS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "exam": lambda a: [exam_seed(s) for s in a.seeds],
    "selection": lambda a: [selection_seed(s) for s in a.seeds],
    "tfcl": lambda a: [tfcl_seed(s) for s in a.seeds],
    "speed": lambda a: speed(a.rounds),
}


if __name__ == "__main__":
    main()
