"""The in-context regression example: with enough heads (H >= 2T) each head serves one task, with
fewer they superpose, and more heads give a lower loss; the test fails if any of this goes."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np

EXAMPLE = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "in_context_regression.py"))
train, held_out_loss, head_allocation = EXAMPLE["train"], EXAMPLE["held_out_loss"], EXAMPLE["head_allocation"]


def test_heads_split_up_or_superpose_by_their_number():
    # one head has nothing to arrange: 400 steps reach its plateau
    models = {h: train(h, steps=400 if h == 1 else 1200, seed=0) for h in (1, 2, 4)}
    losses = {h: held_out_loss(m) for h, m in models.items()}
    # two heads debias what one head cannot; four add a little more
    assert losses[2] < 0.6 * losses[1]
    assert losses[4] < losses[2]
    four = head_allocation(models[4])["mass"]
    ratio = four.max(1) / four.min(1)
    assert np.all(ratio > 1.8)  # each head's key-query mass sits on one task's coordinates
    assert sorted(np.bincount(four.argmax(1), minlength=2).tolist()) == [2, 2]  # a pair per task
    two = head_allocation(models[2])
    assert np.all(two["mass"].max(1) / two["mass"].min(1) < 1.25)  # superposition: both tasks
    assert np.all(np.abs(two["readout"]) > 0.5)  # and both heads write both labels
