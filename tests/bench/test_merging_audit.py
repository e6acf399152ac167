"""``mtlkit audit``'s configuration and report: validated keys, the insights computed from the
summaries (rank correlations, the most vulnerable merge), and every configured merge in the table."""

from __future__ import annotations

import pytest

import mtlkit as mk
from mtlkit.bench.merging_audit import AuditConfig, AuditMethod, insights, load_audit_config, report


def test_the_config_is_validated(tmp_path):
    good = tmp_path / "audit.yaml"
    good.write_text(
        "track: mlp8\nseeds: [0, 1]\nimages: 50\nattacks: [fgsm, pgd]\nbudgets: [0.03]\n"
        "methods:\n  - {label: avg, name: average}\n  - {name: task_arithmetic, scaling: search}\n"
        "  - {name: adamerging, data: test_time, options: {steps: 10}}\n"
    )
    cfg = load_audit_config(good)
    assert [m.label for m in cfg.methods] == ["avg", "task_arithmetic", "adamerging"]
    assert cfg.methods[1].scaling == "search" and cfg.methods[2].options == {"steps": 10}
    for text, error in [
        ("track: cifar\nmethods: [{name: average}]\n", mk.errors.UnknownNameError),
        ("methods: [{name: average}]\nattacks: [carlini]\n", mk.errors.UnknownNameError),
        ("methods: [{name: average, data: labels}]\n", mk.errors.UnknownNameError),
        ("methods: [{name: task_arithmetic, scaling: best}]\n", mk.errors.ConfigError),
        ("methods: []\n", mk.errors.ConfigError),
        ("methods: [{name: average}]\nbudgets: [2.0]\n", mk.errors.ConfigError),
        ("methods: [{name: average}, {name: average}]\n", mk.errors.ConfigError),
        ("methods: [{name: average}]\nepsilon: 3\n", mk.errors.ConfigError),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(error):
            load_audit_config(bad)


def _seed(values: dict[str, tuple[float, float, float]]) -> dict:
    rows = [
        {"target": label, "attack": "fgsm", "relative_transfer": rel, "task": "a", "eps": 0.03}
        for label, (_, _, rel) in values.items()
    ]
    summary = {
        label: {"accuracy": acc, "representation_bias": bias, "relative_transfer": rel, "scaling": None}
        for label, (acc, bias, rel) in values.items()
    }
    return {"seed": 0, "rows": rows, "summary": summary}


def test_the_insights_and_the_report():
    # accuracy rises with vulnerability and bias falls with it over six merges: both insights hold
    # beyond the 5% critical value (1.96 / sqrt(5) = 0.88); averaging is not the most vulnerable
    values = {f"m{i}": (50.0 + i, 0.9 - 0.1 * i, 0.2 + 0.1 * i) for i in range(5)}
    values = {"avg": (49.0, 1.0, 0.1), **values}
    labels = list(values)
    found = insights([_seed(values)], labels)
    assert found["accuracy_vs_transfer"] == pytest.approx(1.0)
    assert found["bias_vs_transfer"] == pytest.approx(-1.0)
    assert found["most_vulnerable"] == "m4"
    cfg = AuditConfig(
        [AuditMethod("avg", "average")] + [AuditMethod(f"m{i}", "task_arithmetic") for i in range(5)],
        attacks=["fgsm"],
        budgets=[8 / 255],
    )
    text = report(cfg, [_seed(values)], "mtlkit audit x.yaml")
    assert all(f"| {label} |" in text for label in labels)
    assert "+1.00 (holds" in text and "-1.00 (holds" in text and "m4 (not reproduced)" in text
    few = {k: values[k] for k in ("avg", "m0", "m1")}  # three merges can show nothing at 5%
    assert "not shown" in report(
        AuditConfig([AuditMethod(k, "average") for k in few], attacks=["fgsm"]), [_seed(few)], "x"
    )


def test_an_audit_of_a_small_track_scores_every_merge():
    from mtlkit.bench.merging_audit import audit_seed
    from tests.bench.test_merging_track import build

    cfg = AuditConfig(
        [
            AuditMethod("avg", "average"),
            AuditMethod("ta", "task_arithmetic", scaling=0.5),
            AuditMethod("ada", "adamerging", {"steps": 3}, data="test_time"),
            AuditMethod("emr", "emr"),
        ],
        track="mlp8",
        images=30,
        attacks=["fgsm", "pgd"],
        budgets=[0.1],
    )
    result = audit_seed(cfg, 0, log=lambda _: None, build=lambda seed: build())
    assert set(result["summary"]) == {"avg", "ta", "ada", "emr"}
    assert len(result["rows"]) == 4 * 2 * 2 * 1  # merges x tasks x attacks x budgets
    for summary in result["summary"].values():
        assert 0 <= summary["accuracy"] <= 100 and summary["representation_bias"] >= 0
        assert summary["relative_transfer"] >= 0
    assert result["summary"]["ta"]["scaling"] == 0.5
    assert "| emr |" in report(cfg, [result], "test")
