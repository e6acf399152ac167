"""The diagonal-network analysis example: the effects it shows are there, and would fail if gone."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np

EXAMPLE = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "diagonal_networks.py"))
teacher, fit, train, main_error = EXAMPLE["teacher"], EXAMPLE["fit"], EXAMPLE["train"], EXAMPLE["main_error"]


def test_the_conservation_law_holds_up_to_the_step_size():
    problem = teacher(200, 16, nested=True, seed=0)
    rng = np.random.default_rng(0)
    u, v = 0.01 * np.abs(rng.normal(size=100)) + 0.01, 0.01 * np.ones((2, 100))
    tasks = [(problem.x_aux, problem.y_aux, 0), (problem.x_main, problem.y_main, 1)]
    drifts = []
    for lr in (0.02, 0.005):
        _, _, history = train(u, v, tasks, steps=int(40 / lr), lr=lr, track=True)
        start, end = u**2 - (v**2).sum(0), history[-1]
        drifts.append(np.abs(end - start).max())
    # conserved under gradient flow: the drift of gradient descent falls with the step (first order)
    assert drifts[1] < 0.35 * drifts[0]
    _, grown, _ = train(u, v, tasks, steps=2000, lr=0.02)
    assert (grown**2).sum(0).max() > 100 * drifts[0]  # while the weights themselves grew a lot


def test_mtl_learns_group_sparse_features():
    problem = teacher(400, 200, nested=True, seed=0)
    rng = np.random.default_rng(0)
    u, v = 1e-3 * np.abs(rng.normal(size=100)) + 1e-3, 1e-3 * np.ones((2, 100))
    u, v, _ = train(u, v, [(problem.x_aux, problem.y_aux, 0), (problem.x_main, problem.y_main, 1)])
    norms = np.linalg.norm(u[:, None] * v.T, axis=1)  # ||beta_{i,:}|| over the two tasks
    assert (norms > 1e-3).sum() <= 12  # at most 1.2 x the auxiliary support of 10 (of 100 features)
    assert np.all(norms[:10] > 1e-2)  # and every auxiliary feature is used
    # a least-squares fit of the same data uses every feature
    dense = np.linalg.lstsq(problem.x_main, problem.y_main, rcond=None)[0]
    assert (np.abs(dense) > 1e-3).sum() > 50


def median_errors(nested: bool, n_main: int, seeds=(0, 1, 2, 3, 4)) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for seed in seeds:
        problem = teacher(400, n_main, nested, seed)
        for strategy in EXAMPLE["STRATEGIES"]:
            out.setdefault(strategy, []).append(main_error(fit(strategy, problem, seed=seed), problem))
    return {k: float(np.median(v)) for k, v in out.items()}


def test_feature_reuse_helps_a_nested_task_and_hurts_a_disjoint_one():
    nested, disjoint = median_errors(True, 16), median_errors(False, 16)
    assert nested["mtl"] < 0.5 * nested["single"]  # positive transfer: shared features
    assert disjoint["mtl"] > 2 * disjoint["single"]  # negative transfer: the same bias, no shared features
    # rescaling the pretrained weights before finetuning: back to the rich regime
    assert nested["ptft_rescaled"] < 0.7 * nested["ptft"]
    assert disjoint["ptft_rescaled"] < 0.9 * disjoint["ptft"]
