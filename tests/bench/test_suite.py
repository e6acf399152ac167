"""The benchmark suite: config checks, stored baselines and Δm%, resume, reports and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mtlkit as mk
from mtlkit.bench import suite as bench_suite
from mtlkit.bench.suite_config import parse_suite
from mtlkit.bench.suite_report import Summary, build_tables, ranks, report_markdown, write_report
from mtlkit.cli.main import app
from mtlkit.errors import ConfigError, MtlkitError


def tiny(tmp_path, **overrides):
    raw = {
        "name": "tiny",
        "output": str(tmp_path / "out"),
        "seeds": [0, 1],
        "methods": ["ew", {"name": "mgda", "label": "MGDA"}],
        "datasets": [
            {
                "name": "mmoe_synthetic",
                "label": "synthetic",
                "options": {"n_train": 600, "n_val": 200, "n_test": 200, "dim": 8},
                "epochs": 2,
                "batch_size": 100,
                "architectures": [
                    {"name": "shared_bottom", "options": {"bottom_dims": [16], "tower_dims": [8]}}
                ],
            }
        ],
    }
    raw.update(overrides)
    return parse_suite(raw)


def test_summary_is_the_student_t_interval():
    s = Summary.of([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.n == 3
    assert s.half_width == pytest.approx(4.302652729911275 / math.sqrt(3))
    one = Summary.of([5.0, float("nan")])
    assert one.n == 1 and math.isnan(one.half_width) and one.text(1) == "5.0"
    assert Summary.of([]).text(2) == "—"


def test_ranks_share_ties_and_put_nan_last():
    r = ranks({"a": 1.0, "b": 3.0, "c": 3.0, "d": float("nan")}, higher_is_better=True)
    assert r == {"b": 1.5, "c": 1.5, "a": 3.0, "d": 4.0}
    assert ranks({"a": 1.0, "b": 2.0}, higher_is_better=False) == {"a": 1.0, "b": 2.0}


def test_all_expands_to_every_method_that_runs_on_any_architecture(tmp_path):
    suite = tiny(tmp_path, methods=["all"])
    everything = mk.methods.available()
    needs_a_model = [n for n in everything if mk.methods.method_class(n).model_requirement]
    assert needs_a_model == ["fuller"]
    assert [m.name for m in suite.methods] == [n for n in everything if n not in needs_a_model]


def test_a_dataset_may_run_its_own_methods(tmp_path):
    base = tiny(tmp_path)
    modality = {
        **tiny_dataset(),
        "label": "two modalities",
        "architectures": [{"name": "modality_fusion", "options": {"encoder_dims": [8], "trunk_dims": [8]}}],
        "methods": ["ew", "fuller"],
    }
    suite = tiny(tmp_path, datasets=[tiny_dataset(), modality])
    jobs = bench_suite.method_jobs(suite, {}, {"synthetic": ["y1", "y2"], "two modalities": ["y1", "y2"]})
    pairs = {(j.dataset.title, j.method.title) for j in jobs}
    assert pairs == {
        ("synthetic", "ew"),
        ("synthetic", "MGDA"),
        ("two modalities", "ew"),
        ("two modalities", "fuller"),
    }
    assert base.datasets[0].methods is None
    with pytest.raises(ConfigError, match="appear twice"):
        tiny(tmp_path, datasets=[{**modality, "methods": ["fuller", "fuller"]}])


def tiny_dataset():
    return {
        "name": "mmoe_synthetic",
        "label": "synthetic",
        "options": {"n_train": 600, "n_val": 200, "n_test": 200, "dim": 8},
        "epochs": 2,
        "batch_size": 100,
        "architectures": [{"name": "shared_bottom", "options": {"bottom_dims": [16], "tower_dims": [8]}}],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sedes": [0]}, "Did you mean seeds"),
        ({"methods": ["pcgard"]}, "pcgrad"),
        ({"methods": ["ew", "ew"]}, "appear twice"),
        ({"methods": [{"name": "cagrad", "options": {"cc": 0.4}}]}, "cc"),
        ({"seeds": []}, "non-empty"),
        ({"seeds": [1, 1]}, "repeats"),
        ({"datasets": []}, "at least one dataset"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_suites_are_refused_before_anything_runs(tmp_path, change, message):
    with pytest.raises(MtlkitError, match=message):
        tiny(tmp_path, **change)


def test_bad_dataset_entries_are_refused(tmp_path):
    base = tiny(tmp_path)  # noqa: F841 (the valid suite parses)
    bad = {"name": "mmoe_synthetic", "architectures": [{"name": "shared_bottom"}], "selection": "best"}
    with pytest.raises(ConfigError, match="selection"):
        tiny(tmp_path, datasets=[bad])
    with pytest.raises(ConfigError, match="architectures"):
        tiny(tmp_path, datasets=[{"name": "mmoe_synthetic"}])
    with pytest.raises(ConfigError, match="Unknown option model.options.widths"):
        tiny(
            tmp_path,
            datasets=[
                {"name": "mmoe_synthetic", "architectures": [{"name": "mmoe", "options": {"widths": 3}}]}
            ],
        )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    suite = tiny(tmp)
    results = bench_suite.run_suite(suite, workers=1, log=lambda _: None)
    return suite, results


def test_every_run_is_stored_with_delta_m_against_its_own_seeds_baselines(finished):
    _, results = finished
    assert len(results) == 2 * 2 + 2 * 2  # baselines (2 tasks x 2 seeds) + 2 methods x 2 seeds
    for key, r in results.items():
        assert "error" not in r, key
        assert r["seconds"] > 0 and r["steps"] == 12 and len(r["epochs"]) == 2
        assert r["epochs"][1]["seconds"] >= r["epochs"][0]["seconds"]
    for seed in (0, 1):
        ref = bench_suite.reference_of(results, "synthetic", "shared_bottom", seed, ["y1", "y2"])
        run = results[f"synthetic/shared_bottom/MGDA/seed{seed}"]
        # Δm% recomputed from the stored test metrics of the same seed's single-task models
        expected = mk.metrics.delta_m(run["test"], ref["test"], run["directions"])
        assert run["delta_m"] == pytest.approx(expected)
        # validation Δm% after every epoch, against the baselines' validation metrics
        assert all(math.isfinite(e["val/delta_m"]) for e in run["epochs"])
    weights = results["synthetic/shared_bottom/MGDA/seed0"]["trace"]
    assert {"step", "weight/y1", "weight/y2"} <= set(weights)


def test_a_rerun_reuses_stored_runs_and_reruns_only_what_changed(finished, tmp_path):
    suite, results = finished
    again = bench_suite.run_suite(suite, workers=1, log=lambda _: None)
    assert all(r.get("reused") for r in again.values())
    assert {k: r["test"] for k, r in again.items()} == {k: r["test"] for k, r in results.items()}
    changed = parse_suite(
        {
            **_raw(suite),
            "methods": ["ew", {"name": "mgda", "label": "MGDA", "options": {"normalization": "l2"}}],
        }
    )
    third = bench_suite.run_suite(changed, workers=1, log=lambda _: None)
    fresh = sorted(k for k, r in third.items() if not r.get("reused"))
    assert fresh == ["synthetic/shared_bottom/MGDA/seed0", "synthetic/shared_bottom/MGDA/seed1"]
    bench_suite.run_suite(suite, workers=1, log=lambda _: None)  # restore the shared fixture's runs


def _raw(suite):
    return {
        "name": suite.name,
        "output": suite.output,
        "seeds": suite.seeds,
        "datasets": [
            {
                "name": d.name,
                "label": d.label,
                "options": d.options,
                "epochs": d.epochs,
                "batch_size": d.batch_size,
                "architectures": [{"name": a.name, "options": a.options} for a in d.architectures],
            }
            for d in suite.datasets
        ],
    }


def test_a_failed_run_is_reported_and_the_suite_goes_on(finished, tmp_path, monkeypatch):
    suite = tiny(tmp_path)
    real = bench_suite._train

    def flaky(job, directory):
        if job.method.title == "MGDA" and job.seed == 1:
            raise FloatingPointError("diverged")
        return real(job, directory)

    monkeypatch.setattr(bench_suite, "_train", flaky)
    results = bench_suite.run_suite(suite, workers=1, log=lambda _: None)
    assert results["synthetic/shared_bottom/MGDA/seed1"]["error"] == "FloatingPointError: diverged"
    text = report_markdown(suite, bench_suite.collect_results(suite), "test", None)
    assert "## Failed runs" in text and "diverged" in text
    assert "| MGDA (1 seed; 1 failed) |" in text
    monkeypatch.setattr(bench_suite, "_train", real)
    bench_suite.run_suite(suite, workers=1, log=lambda _: None)  # the failure is retried, then cleared
    assert "error" not in bench_suite.collect_results(suite)["synthetic/shared_bottom/MGDA/seed1"]


def test_report_tables_plots_and_json(finished, tmp_path):
    suite, results = finished
    (table,) = build_tables(suite, results)
    assert [r.method for r in table.rows] == ["ew", "MGDA"]
    assert sorted(r.mean_rank for r in table.rows) in ([1.0, 2.0], [1.5, 1.5]) or all(
        1.0 <= r.mean_rank <= 2.0 for r in table.rows
    )
    written = write_report(suite, results, "mtlkit bench tiny.yaml", 12.0, tmp_path / "report.md")
    names = {p.name for p in written}
    assert {"report.md", "report.json", "synthetic_shared_bottom_pareto.png"} <= names
    assert "synthetic_shared_bottom_time_to_quality.png" in names
    text = (tmp_path / "report.md").read_text()
    assert "| single-task |" in text and "**" in text and "mtlkit bench tiny.yaml" in text
    data = json.loads((tmp_path / "report.json").read_text())
    ew = data["tables"][0]["methods"]["ew"]["delta_m"]
    assert ew["low"] <= ew["mean"] <= ew["high"] and ew["n"] == 2


def test_cli_reports_stored_results_without_training(finished, tmp_path):
    suite, _ = finished
    path = tmp_path / "suite.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**_raw(suite), "methods": ["ew", {"name": "mgda", "label": "MGDA"}]}))
    out = CliRunner().invoke(app, ["bench", str(path), "--report-only", "--report", str(tmp_path / "r.md")])
    assert out.exit_code == 0, out.output
    assert "wrote" in out.output and (tmp_path / "r.md").exists()


@pytest.mark.slow
def test_parallel_workers_give_the_sequential_results(finished, tmp_path):
    _, results = finished
    parallel = tiny(tmp_path)
    got = bench_suite.run_suite(parallel, workers=2, log=lambda _: None)
    assert sorted(got) == sorted(results)
    for key, r in got.items():
        assert r["test"] == results[key]["test"], key
        assert r["peak_memory_mib"] is None or r["peak_memory_mib"] >= 0


def test_many_tasks_are_summarised_in_one_column(tmp_path):
    suite = tiny(tmp_path, seeds=[0])
    tasks = [f"t{i}" for i in range(13)]
    directions = {t: {"mse": False} for t in tasks}
    results = {
        f"synthetic/shared_bottom/single_task/{t}/seed0": {
            "key": f"synthetic/shared_bottom/single_task/{t}/seed0",
            "kind": "single_task",
            "task": t,
            "seed": 0,
            "test": {t: {"mse": 1.0 if t != "t12" else float("nan")}},
            "seconds": 1.0,
        }
        for t in tasks
    }
    for method in ("ew", "MGDA"):
        results[f"synthetic/shared_bottom/{method}/seed0"] = {
            "key": f"synthetic/shared_bottom/{method}/seed0",
            "kind": "multi_task",
            "method": method,
            "seed": 0,
            "directions": directions,
            "test": {t: {"mse": 0.5 if method == "ew" else 2.0} for t in tasks},
            "delta_m": 50.0 if method == "ew" else -100.0,
            "seconds": 1.0,
            "peak_memory_mib": 1.0,
        }
    (table,) = build_tables(suite, results)
    assert table.columns == [("mean over 13 tasks", "mse", False)]
    assert table.baseline["mean over 13 tasks/mse"].mean == 1.0  # the task without a test pupil left out
    assert [r.metrics["mean over 13 tasks/mse"].mean for r in table.rows] == [0.5, 2.0]
    assert "| ew | **0.500** | **50.00** | **1.0** |" in report_markdown(suite, results, "x", None)


def test_a_report_of_stored_results_keeps_the_training_command_and_time(finished):
    suite, results = finished
    write_report(suite, results, "mtlkit bench tiny.yaml --workers 2", 61.0)
    write_report(suite, results, "mtlkit bench tiny.yaml --report-only", None)
    data = json.loads((Path(suite.output) / "report-tiny.json").read_text())
    assert data["command"] == "mtlkit bench tiny.yaml --workers 2" and data["wall_seconds"] == 61.0
    assert "Wall time 1.0 min" in (Path(suite.output) / "report-tiny.md").read_text()


def test_runs_whose_baseline_failed_are_reported_not_run(tmp_path, monkeypatch):
    suite = tiny(tmp_path)
    real = bench_suite._train

    def flaky(job, directory):
        if job.task == "y2" and job.seed == 1:
            raise OSError("disk full")
        return real(job, directory)

    monkeypatch.setattr(bench_suite, "_train", flaky)
    results = bench_suite.run_suite(suite, workers=1, log=lambda _: None)
    for method in ("ew", "MGDA"):
        assert "error" not in results[f"synthetic/shared_bottom/{method}/seed0"]
        assert "baseline" in results[f"synthetic/shared_bottom/{method}/seed1"]["error"]
    assert bench_suite.reference_of(results, "synthetic", "shared_bottom", 1, ["y1", "y2"]) is None
