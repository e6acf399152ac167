"""The ANT toy example: O1 (affinity falls with the noise-level gap) and O2 (negative transfer: a
specialist beats the joint model on its interval) are there, and the test fails if either goes."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np

EXAMPLE = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "ant_negative_transfer.py"))


def test_o1_and_o2_on_the_toy():
    result = EXAMPLE["run"](seed=0, n=2000, epochs=10)
    # O1: the gradient cosine between two timesteps falls with their gap
    assert result["rho"] < -0.3
    gap_means = np.asarray(result["gap_means"])
    assert gap_means[: len(gap_means) // 4].mean() > gap_means[-len(gap_means) // 4 :].mean() + 0.1
    # O2: at the highest noise levels the specialist is far better than the joint model
    joint, specialist = np.asarray(result["joint"]), np.asarray(result["specialist"])
    assert joint[-1] > 3 * specialist[-1]
    assert np.all(np.isfinite(joint)) and np.all(specialist > 0)
