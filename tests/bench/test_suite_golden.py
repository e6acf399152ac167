"""Golden numbers: a slice of the committed quick suite (Multi-Fashion, seed 0, EW and MGDA, with
their single-task baselines) is trained again and must land inside the committed 95% intervals,
and close to the committed seed-0 runs themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlkit.bench import suite as bench_suite
from mtlkit.bench.suite_config import expand_methods, load_suite
from mtlkit.errors import DatasetNotAvailableError

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "suite_quick.json"
SLICE = ("ew", "mgda")


@pytest.mark.slow
@pytest.mark.data
def test_a_slice_of_the_quick_suite_reproduces_the_committed_results(tmp_path):
    golden = json.loads(COMMITTED.read_text())
    suite = load_suite(ROOT / "benchmarks" / "suites" / "quick.yaml")
    suite.datasets = [d for d in suite.datasets if d.name == "multi_fashion"]
    suite.methods = expand_methods(list(SLICE))
    suite.seeds, suite.output = [0], str(tmp_path / "out")
    try:
        bench_suite.load_dataset(suite.datasets[0], 0)
    except DatasetNotAvailableError as exc:
        pytest.skip(str(exc))
    results = bench_suite.run_suite(suite, workers=1, log=lambda _: None)
    (table,) = [t for t in golden["tables"] if t["dataset"] == suite.datasets[0].title]
    for method in SLICE:
        key = f"{table['dataset']}/{table['architecture']}/{method}/seed0"
        mine, committed = results[key], golden["runs"][key]
        assert "error" not in mine, mine.get("error")
        summary = table["methods"][method]
        assert summary["delta_m"]["low"] <= mine["delta_m"] <= summary["delta_m"]["high"], method
        assert mine["delta_m"] == pytest.approx(committed["delta_m"], abs=1.5), method
        for task in ("left", "right"):
            accuracy = mine["test"][task]["accuracy"]
            interval = summary["metrics"][f"{task}/accuracy"]
            assert interval["low"] <= accuracy <= interval["high"], (method, task)
            assert accuracy == pytest.approx(committed["test"][task]["accuracy"], abs=0.01), (method, task)
