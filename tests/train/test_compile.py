"""Compiled steps: the Trainer's ``compile=True`` (the model's parts and the loss computation under
``torch.compile``) computes the eager update for a loss weighting and Gramian methods at both
levels, and a model compiled as a whole gets a clear error instead of wrong gradients."""

from __future__ import annotations

import copy

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import EngineError

TASKS = mk.TaskSet([mk.Task("a", "mse"), mk.Task("b", "bce")])


def _batches(n: int = 6) -> list[mk.Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(32, 6, generator=g)
        a = x[:, 0] - x[:, 1]
        a[:5] = float("nan")  # missing labels go through the compiled loss too
        out.append(mk.Batch(x, {"a": a, "b": (x[:, 2] > 0).float()}))
    return out


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return mk.models.MMoE(6, TASKS, num_experts=2, expert_dims=[8], tower_dims=[4])


def _trained(method: str, compiled: bool) -> dict[str, torch.Tensor]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = mk.Trainer(model, TASKS, method, optimizer, device="cpu", progress=False, compile=compiled)
    for batch in _batches():
        trainer.train_step(batch)
    return model.state_dict()


def _difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()  # compiling the parts keeps every parameter name
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    "method",
    ["mgda_ub", pytest.param("ew", marks=pytest.mark.slow), pytest.param("upgrad", marks=pytest.mark.slow)],
)
def test_a_compiled_step_computes_the_eager_update(method):
    eager, compiled = _trained(method, False), _trained(method, True)
    assert _difference(eager, _model().state_dict()) > 1e-3  # the steps moved the weights
    assert _difference(eager, compiled) < 1e-5


def test_compile_parts_compiles_each_part_in_place():
    model = _model()
    names = list(model.state_dict())
    mk.models.compile_parts(model)
    assert list(model.state_dict()) == names
    compiled = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(compiled) == 2 + 2 + 2  # two experts, two gates, two towers


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_a_model_compiled_as_a_whole_is_refused_with_the_way_out(level):
    whole = torch.compile(_model())
    batch = _batches(1)[0]
    output = whole(batch.inputs, full_output=True)
    losses = TASKS.losses(output.predictions, batch.targets)
    method = mk.methods.create("mgda", level=level)
    method.setup(TASKS, whole)
    before = copy.deepcopy(whole.state_dict())
    with pytest.raises(EngineError, match="compile_parts"):
        method.backward(losses, whole, output)
    assert all(p.grad is None for p in whole.parameters())
    assert _difference(before, whole.state_dict()) == 0.0
