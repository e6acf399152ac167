"""The README's Python examples run as written: the quick start (one epoch, no progress bars) and
the own-loop example for every registered method."""

import re
from pathlib import Path

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import DatasetNotAvailableError

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.data
def test_readme_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = (
        BLOCKS[0]
        .replace("epochs=2", "epochs=1")
        .replace('log_dir="runs/quick"', 'log_dir="runs/quick", progress=False')
    )
    namespace: dict = {}
    try:
        exec(compile(code, str(README), "exec"), namespace)
    except DatasetNotAvailableError as exc:
        pytest.skip(str(exc))
    assert namespace["info"].weights.shape == (2,)
    assert (tmp_path / "runs" / "quick" / "steps.csv").exists()


@pytest.mark.parametrize("name", mk.methods.available())
def test_readme_own_loop_runs_for_every_method(name):
    if mk.methods.create(name).batches_per_step > 1:
        pytest.skip("uses several batches per step: its own loop is in docs/aggregators.md (tested)")
    if mk.methods.method_class(name).model_requirement:
        pytest.skip("needs a model with modality branches: its example is in docs/schemes.md (tested)")
    code = BLOCKS[1]
    assert 'mk.methods.create("famo")' in code
    code = code.replace('mk.methods.create("famo")', f"mk.methods.create({name!r})")
    code = code.replace("n_train=2048", "n_train=256").replace("range(3)", "range(2)")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    model, method = namespace["model"], namespace["method"]
    assert torch.isfinite(namespace["info"].losses).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if mk.methods.Hook.EPOCH_END in method.hooks:
        assert not method._epoch_open  # every epoch was closed
