"""Task-vector diagnostics: exact cosines, norms and sign-conflict rates on hand-built vectors."""

from __future__ import annotations

import math

import torch

import mtlkit as mk


def test_norms_cosines_and_conflicts_by_hand(tmp_path):
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2), "n": torch.tensor(1)}
    a = {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([1.0, 1.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([[-1.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    d = mk.merging.diagnose(base, {"a": a, "b": b})
    assert d.tensors == ["w", "b"]  # integer tensors are not task vectors
    assert d.norms[0] == [1.0, math.sqrt(5)]
    assert math.isclose(d.cosines[0][("a", "b")], -1 / math.sqrt(5))
    assert math.isclose(d.cosines[1][("a", "b")], 1.0)
    # w: coordinates moved 2, opposed 1; b: moved 2, opposed 0
    assert d.conflicts == [0.5, 0.0] and d.conflict == 0.25
    # whole model: a = (1, 0, 0, 0, 1, 1), b = (-1, 0, 0, 2, 1, 1): dot 1, norms sqrt(3), sqrt(7)
    assert math.isclose(d.cosine[("a", "b")], 1 / math.sqrt(21))
    table = d.table()
    assert "| **model** |" in table and "cos a~b" in table
    assert d.plot(tmp_path / "tv.png").stat().st_size > 0
