"""Inductive biases of multi-task learning and of pretraining + finetuning in diagonal linear networks.

After Lippl & Lindsey, "Inductive biases of multi-task learning and finetuning: multiple regimes of
feature reuse", NeurIPS 2024. The network is ``f_t(x) = sum_i u_i v_{t,i} x_i``: a shared gain
``u_i`` per input feature and a readout ``v_t`` per task, so task t's linear coefficients are
``beta_t = u * v_t``. Trained by gradient descent on squared loss from a small initialisation
(scale ``alpha``: the "rich" regime), it shows three effects of the paper, each measured here:

1. **Conservation law.** Under gradient flow ``u_i^2 - sum_t v_{t,i}^2`` is constant for every
   feature ``i``: what a feature's gain grows, its readouts must grow with it. Gradient descent keeps
   it up to the step size.
2. **Group sparsity of MTL.** Joint training's implicit penalty acts like an l1/l2 group norm over
   the tasks of each feature: the learned per-feature norms ``||beta_{i,:}||`` are sparse, and the
   main task reuses the auxiliary task's features.
3. **Feature reuse cuts both ways, and rescaling matters for PT + FT.** With a main task whose
   support is inside the auxiliary one, MTL learns the main task from fewer samples than the main
   task alone; with a disjoint support the same bias towards reusing features is negative transfer.
   Plain PT + FT starts from the auxiliary function and must unlearn the auxiliary features;
   rescaling the pretrained weights down (``c = 0.1``) before finetuning puts it back in the rich
   regime, where it selects a sparse subset of the pretrained features (the paper's nested
   feature selection) and does far better than without the rescaling.

The teacher: ``d = 100`` features; the auxiliary task uses 10 of them (Gaussian coefficients), the
main task 3 of those 10 ("nested") with unit coefficients, or 3 others ("disjoint"). Main-task test
error is measured over several main-task sample sizes, for: the main task alone; MTL (the sum of the
two losses); PT + FT (pretrain on the auxiliary task, finetune every weight on the main task); PT +
FT with the pretrained weights rescaled by ``c = 0.1`` first. A reconstruction at toy scale of the
paper's diagonal-network experiments, not its exact settings.

    python examples/diagonal_networks.py --out runs/diagonal_networks.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtlkit.core.figures import pyplot, save_figure

D, AUX_SUPPORT, MAIN_SUPPORT = 100, 10, 3


@dataclass
class Problem:
    x_aux: np.ndarray
    y_aux: np.ndarray
    x_main: np.ndarray
    y_main: np.ndarray
    beta_main: np.ndarray


def teacher(n_aux: int, n_main: int, nested: bool, seed: int, noise: float = 0.05) -> Problem:
    rng = np.random.default_rng(seed)
    beta_aux = np.zeros(D)
    beta_aux[:AUX_SUPPORT] = rng.normal(size=AUX_SUPPORT)
    beta_main = np.zeros(D)
    support = np.arange(MAIN_SUPPORT) if nested else np.arange(AUX_SUPPORT, AUX_SUPPORT + MAIN_SUPPORT)
    beta_main[support] = rng.choice([-1.0, 1.0], MAIN_SUPPORT)
    x_aux, x_main = rng.normal(size=(n_aux, D)), rng.normal(size=(n_main, D))
    return Problem(
        x_aux,
        x_aux @ beta_aux + noise * rng.normal(size=n_aux),
        x_main,
        x_main @ beta_main + noise * rng.normal(size=n_main),
        beta_main,
    )


def train(
    u: np.ndarray,
    v: np.ndarray,
    tasks: list[tuple[np.ndarray, np.ndarray, int]],
    steps: int = 6000,
    lr: float = 0.05,
    track: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Gradient descent on ``sum_t 1/(2 n_t) ||X_t (u * v_t) - y_t||^2`` over the tasks given as
    ``(X, y, readout row)``; returns ``u``, ``v`` and (with ``track``) the conserved quantity
    ``u^2 - sum_t v_t^2`` at every step."""
    u, v = u.copy(), v.copy()
    rows = [row for _, _, row in tasks]
    history = []
    for _ in range(steps):
        grad_u = np.zeros_like(u)
        grad_v = np.zeros_like(v)
        for x, y, row in tasks:
            residual = x @ (u * v[row]) - y
            g = x.T @ residual / len(y)  # gradient with respect to beta_row
            grad_u += v[row] * g
            grad_v[row] += u * g
        u -= lr * grad_u
        v -= lr * grad_v
        if track:
            history.append(u**2 - (v[rows] ** 2).sum(0))
    return u, v, history


def main_error(beta: np.ndarray, problem: Problem) -> float:
    """Main-task test error: the expected squared error on fresh Gaussian inputs (noise excluded)."""
    return float(((beta - problem.beta_main) ** 2).sum())


def fit(strategy: str, problem: Problem, alpha: float = 1e-3, seed: int = 0) -> np.ndarray:
    """The main task's learned coefficients under ``strategy``: ``single``, ``mtl``, ``ptft`` or
    ``ptft_rescaled`` (pretrained weights multiplied by 0.1 before finetuning)."""
    rng = np.random.default_rng(seed + 1000)
    aux = (problem.x_aux, problem.y_aux, 0)
    main = (problem.x_main, problem.y_main, 1)
    u = alpha * np.abs(rng.normal(size=D)) + alpha
    v = alpha * np.ones((2, D))
    if strategy == "single":
        u, v, _ = train(u, v, [main])
        return u * v[1]
    if strategy == "mtl":
        u, v, _ = train(u, v, [aux, main])
        return u * v[1]
    u, v, _ = train(u, v, [aux])  # pretrain: the main readout stays at its initial value
    v[1] = v[0]  # finetune the pretrained network itself (one readout), on the main task
    if strategy == "ptft_rescaled":
        u, v = 0.1 * u, 0.1 * v
    u, v, _ = train(u, v, [main])
    return u * v[1]


STRATEGIES = ("single", "mtl", "ptft", "ptft_rescaled")


def sweep(sizes: list[int], seeds: list[int], nested: bool) -> dict[str, np.ndarray]:
    """Main-task test error, ``(len(seeds), len(sizes))`` per strategy."""
    out = {s: np.zeros((len(seeds), len(sizes))) for s in STRATEGIES}
    for i, seed in enumerate(seeds):
        for j, n in enumerate(sizes):
            problem = teacher(400, n, nested, seed)
            for s in STRATEGIES:
                out[s][i, j] = main_error(fit(s, problem, seed=seed), problem)
    return out


def figure(
    sizes: list[int], nested: dict[str, np.ndarray], disjoint: dict[str, np.ndarray], path: Path
) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, results, title in [
        (axes[0], nested, "main support inside the auxiliary one"),
        (axes[1], disjoint, "disjoint supports"),
    ]:
        for s in STRATEGIES:
            ax.plot(sizes, np.median(results[s], axis=0), "-o", label=s)
        ax.set(xscale="log", yscale="log", xlabel="main-task samples", title=title)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("main-task test error (median over seeds)")
    axes[0].legend()
    fig.suptitle("Diagonal linear networks: MTL against pretraining + finetuning (Lippl & Lindsey)")
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/diagonal_networks.png"))
    args = parser.parse_args()
    nested, disjoint = sweep(args.sizes, args.seeds, True), sweep(args.sizes, args.seeds, False)
    for name, results in [("nested", nested), ("disjoint", disjoint)]:
        print(f"{name}: median main-task test error by main-task samples {args.sizes}")
        for s in STRATEGIES:
            print(f"  {s:14s} " + " ".join(f"{e:8.4f}" for e in np.median(results[s], axis=0)))
    print(f"wrote {figure(args.sizes, nested, disjoint, args.out)}")


if __name__ == "__main__":
    main()
