"""The README's Python quick start runs as written (one epoch, no progress bars)."""

import re
from pathlib import Path

import pytest

from mtlkit.errors import DatasetNotAvailableError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.data
def test_readme_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    code = code.replace("epochs=2", "epochs=1").replace(
        'log_dir="runs/quick"', 'log_dir="runs/quick", progress=False'
    )
    namespace: dict = {}
    try:
        exec(compile(code, str(README), "exec"), namespace)
    except DatasetNotAvailableError as exc:
        pytest.skip(str(exc))
    assert namespace["info"].weights.shape == (2,)
    assert (tmp_path / "runs" / "quick" / "steps.csv").exists()
