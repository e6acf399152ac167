"""``mtlkit affinity``: its configuration is checked before any data is loaded; a run writes the
matrices, groups, agreement and the group comparison; the pieces (agreement, assignment) on
hand-made matrices."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtlkit.cli.main import app
from mtlkit.errors import ConfigError
from mtlkit.relatedness.affinity_config import load_affinity_config
from mtlkit.relatedness.affinity_job import _assign, agreement

BASE = {
    "seed": 0,
    "data": {"name": "mmoe_synthetic", "batch_size": 128},
    "model": {"name": "shared_bottom", "options": {"bottom_dims": [8], "tower_dims": [4]}},
    "method": {"name": "ew"},
    "trainer": {"epochs": 1, "progress": False, "tensorboard": False},
}


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "path", sorted((ROOT / "benchmarks" / "relatedness").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_affinity_configs_validate(path):
    job = load_affinity_config(path)
    assert job.affinity.train_groups and len(job.affinity.seeds) >= 3


def write(tmp_path, affinity):
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output": str(tmp_path / "out"), "affinity": affinity}))
    return path


@pytest.mark.parametrize(
    ("affinity", "match"),
    [
        ({"budjet": 2}, "Did you mean affinity.budget"),
        ({"budget": 0}, "budget must be >= 1"),
        ({"group_by": ["tag", "loss"]}, "group_by"),
        ({"mtif": None, "group_by": ["mtif"]}, "mtif is null"),
        ({"mtif": {"solver": "newton"}}, "solver"),
        ({"seeds": []}, "seeds"),
        ({"train_size": 0}, "train_size"),
        ({"singleton_score": float("nan")}, "singleton_score"),
        ({"seeds": [0, 0]}, "repeat"),
        ({"mtif": {"damping": float("nan")}}, "damping"),
        ({"mtif": {"solver": "cg", "options": {"max_iterations": -1}}}, "max_iterations"),
        ({"mtif": {"solver": "cg", "options": {"depth": 10}}}, "takes options"),
    ],
)
def test_bad_affinity_configs_are_refused_before_loading_data(tmp_path, affinity, match):
    with pytest.raises(ConfigError, match=match):
        load_affinity_config(write(tmp_path, affinity))


def test_the_command_writes_matrices_groups_and_the_comparison(tmp_path):
    path = write(tmp_path, {"every": 5, "train_size": 2000, "train_groups": True, "seeds": [0, 1]})
    result = CliRunner().invoke(app, ["affinity", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    data = json.loads((out / "affinity.json").read_text())
    assert data["tasks"] == ["y1", "y2"]
    assert set(data["matrices"]) == {"tag", "cosine", "cross_loss", "mtif"}
    assert all(len(m) == 2 and len(m[0]) == 2 for m in data["matrices"].values())
    assert data["matrices"]["cosine"][0][0] == pytest.approx(1.0)
    assert set(data["groups"]) == {"tag", "cosine", "mtif"} and "tag~mtif" in data["agreement"]
    seeds = data["comparison"]["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    assert set(seeds[0]["delta_m"]) == {"all-in-one", "tag groups", "cosine groups", "mtif groups"}
    observed = data["comparison"]["observed_transfer"]
    assert observed["y1"] == pytest.approx(sum(s["transfer"]["y1"] for s in seeds) / 2)
    predicted = data["comparison"]["predicted_transfer"]
    assert predicted["cosine"]["onto"]["y1"] == pytest.approx(data["matrices"]["cosine"][1][0])
    for measure, v in predicted.items():
        expected = np.mean([(v["onto"][t] > 0) == (observed[t] > 0) for t in ("y1", "y2")])
        assert v["sign_match"] == pytest.approx(expected), measure
    lower = {"mse", "mae", "l1"}  # the synthetic tasks' metrics: lower is better
    for entry in seeds:
        for label, value in entry["delta_m"].items():
            changes = [
                statistics.mean(
                    (-1 if m in lower else 1)
                    * (v - entry["single-task"][t][m])
                    / abs(entry["single-task"][t][m])
                    * 100
                    for m, v in metrics.items()
                )
                for t, metrics in entry[label].items()
            ]
            assert value == pytest.approx(statistics.mean(changes)), label
    assert (out / "affinity.png").stat().st_size > 0 and "Suggested groups" in (
        out / "affinity.md"
    ).read_text()
    assert "tag groups:" in result.output


def test_agreement_counts_directed_pairs_and_correlates_values():
    a = torch.tensor([[1.0, 0.5, -0.2], [0.3, 1.0, 0.1], [-0.4, 0.2, 1.0]])
    b = a.clone()
    b[0, 2] = 0.3  # one of six directed pairs disagrees in sign
    out = agreement({"tag": a, "mtif": b})
    assert out["tag~mtif"]["sign_agreement"] == pytest.approx(5 / 6)
    assert -1 <= out["tag~mtif"]["spearman"] <= 1
    kept = agreement({"tag": a, "cross_loss": (a > 0).double() * 0.5})
    assert kept["tag~cross_loss"]["sign_agreement"] == 1.0  # kept sources are the helpful ones


def test_a_task_trains_alone_when_every_group_brings_it_negative_affinity_if_singletons_score_zero():
    from mtlkit.relatedness import select_groups

    a = np.array([[1.0, -0.2], [0.3, 1.0]])  # row = source: task 1 helps task 0, task 0 hurts task 1
    assert select_groups(a, budget=2)[0] == [(0, 1)]  # official: never alone
    groups, _ = select_groups(a, budget=2, singleton_score=0.0)
    assert sorted(groups) == [(0, 1), (1,)]
    plan = _assign([("b",), ("a", "b")], a.tolist(), ["a", "b"], singleton_score=0.0)
    assert plan == {"a": ("a", "b"), "b": ("b",)}


def test_each_task_is_served_by_the_group_where_it_scores_best():
    names = ["a", "b", "c", "d"]
    m = [[0, 1, 0.1, 0], [1, 0, 0, 0], [0.1, 0, 0, 2], [0, 0, 2, 0]]
    plan = _assign([("a", "b"), ("c", "d"), ("a", "c")], m, names)
    assert plan == {"a": ("a", "b"), "b": ("a", "b"), "c": ("c", "d"), "d": ("c", "d")}
