"""Saving merged models, merge configs (mtlkit's and mergekit's) and ``mtlkit merge``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import mtlkit as mk
from mtlkit.errors import ConfigError, UnknownNameError
from mtlkit.merging.config import load_merge_config


def write_family(tmp_path, tasks=2):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).state_dict()
    save_file(base, str(tmp_path / "base.safetensors"))
    for t in range(tasks):
        sd = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
        save_file(sd, str(tmp_path / f"task{t}.safetensors"))
    return base


def test_save_writes_safetensors_atomically_with_a_model_card(tmp_path):
    base = write_family(tmp_path)
    experts = {f"task{t}": tmp_path / f"task{t}.safetensors" for t in range(2)}
    result = mk.merging.merge(tmp_path / "base.safetensors", experts, "ties", density=0.5)
    path = result.save(tmp_path / "out" / "merged.safetensors", scores={"val/acc": 0.9})
    loaded = load_file(str(path))
    for k, v in result.state_dict.items():
        assert torch.equal(loaded[k], v)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["mtlkit_method"] == "ties"
    card = path.with_suffix(".md").read_text()
    assert "density | 0.5" in card and "`task0`" in card and "val/acc | 0.9" in card
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(ConfigError, match=".safetensors"):
        result.save(tmp_path / "merged.pt")
    assert set(base) == set(loaded)


def test_our_config_and_the_cli(tmp_path):
    write_family(tmp_path)
    cfg = {
        "method": {"name": "task_arithmetic", "options": {"scaling": 0.5}},
        "pretrained": "base.safetensors",
        "experts": {"a": "task0.safetensors", "b": "task1.safetensors"},
        "output": "merged/model.safetensors",
        "precision": "float32",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run(
        [sys.executable, "-m", "mtlkit.cli.main", "merge", str(tmp_path / "merge.yaml")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = mk.merging.merge(
        tmp_path / "base.safetensors",
        {"a": tmp_path / "task0.safetensors", "b": tmp_path / "task1.safetensors"},
        "task_arithmetic",
        scaling=0.5,
        precision="float32",
    ).state_dict
    for k in want:
        assert torch.equal(merged[k], want[k])
    cfg["method"]["options"] = {"scale": 0.5}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run(
        [sys.executable, "-m", "mtlkit.cli.main", "merge", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "takes no option 'scale'" in run.stderr
    card = (tmp_path / "merged" / "model.md").read_text()
    assert "scaling | 0.5 |" in card and "float32" in card


def mergekit_file(tmp_path, name, config):
    (tmp_path / name).write_text(yaml.safe_dump(config))
    return load_merge_config(tmp_path / name)


def test_a_mergekit_config_is_translated_with_mergekits_semantics(tmp_path):
    write_family(tmp_path, tasks=2)
    dare = {
        "merge_method": "dare_ties",
        "base_model": "base.safetensors",
        "models": [
            {"model": "base.safetensors"},  # mergekit configs often list the base too
            {"model": "task0.safetensors", "parameters": {"weight": 0.7, "density": 0.4}},
            {"model": "task1.safetensors", "parameters": {"weight": 0.3, "density": 0.4}},
        ],
        "parameters": {"lambda": 0.9, "int8_mask": True},
        "dtype": "float16",
    }
    cfg = mergekit_file(tmp_path, "dare.yaml", dare)
    assert cfg.method == "dare" and cfg.source == "mergekit" and list(cfg.experts) == ["task0", "task1"]
    # dare_ties sums the agreeing values unless normalize: true (mergekit's default is false)
    assert cfg.options == {
        "combine": "ties",
        "rescale": "l1",
        "weights": [0.7, 0.3],
        "aggregate": "disjoint_sum",
        "scaling": 0.9,
        "drop_rate": pytest.approx(0.6),
    }
    assert any("dtype" in n for n in cfg.notes)
    # without density nothing is sparsified; a model's parameter wins over the global one
    ties = {
        "merge_method": "ties",
        "base_model": "base.safetensors",
        "models": [
            {"model": "task0.safetensors", "parameters": {"weight": 2.0}},
            {"model": "task1.safetensors"},
        ],
        "parameters": {"weight": 0.5},
    }
    cfg = mergekit_file(tmp_path, "ties.yaml", ties)
    assert cfg.options["density"] == 1.0 and cfg.options["weights"] == [2.0, 0.5]
    assert cfg.options["aggregate"] == "disjoint_mean" and cfg.options["scaling"] == 1.0
    assert cfg.options["rounding"] == "floor"  # mergekit keeps int(density n) entries per tensor
    della = mergekit_file(tmp_path, "della.yaml", {**ties, "merge_method": "della"})
    assert della.options["density"] == 1.0 and della.options["epsilon"] == 0.15
    merged = mk.merging.merge(della.pretrained, della.experts, della.method, **della.options)
    assert set(merged.state_dict) == set(load_file(str(tmp_path / "base.safetensors")))
    ta = {**ties, "merge_method": "task_arithmetic", "parameters": {"normalize": True}}
    assert mergekit_file(tmp_path, "ta.yaml", ta).options["weights"] == [2.0 / 3.0, 1.0 / 3.0]
    slerp = {
        "merge_method": "slerp",
        "base_model": "task0.safetensors",
        "models": [{"model": "task0.safetensors"}, {"model": "task1.safetensors"}],
        "parameters": {"t": 0.3},
    }
    cfg = mergekit_file(tmp_path, "slerp.yaml", slerp)
    assert cfg.pretrained is None and list(cfg.experts) == ["task0", "task1"] and cfg.options == {"t": 0.3}
    result = mk.merging.merge(cfg.pretrained, cfg.experts, cfg.method, **cfg.options)
    assert set(result.state_dict) == set(load_file(str(tmp_path / "task0.safetensors")))


def test_mergekit_configs_that_cannot_be_honoured_are_refused(tmp_path):
    write_family(tmp_path, tasks=2)
    base = {"merge_method": "ties", "base_model": "base.safetensors"}
    two = [{"model": "task0.safetensors"}, {"model": "task1.safetensors"}]
    with pytest.raises(UnknownNameError, match="merge_method"):
        mergekit_file(tmp_path, "a.yaml", {**base, "merge_method": "nuslerp", "models": two})
    uneven = [
        {"model": "task0.safetensors", "parameters": {"density": 0.4}},
        {"model": "task1.safetensors", "parameters": {"density": 0.5}},
    ]
    with pytest.raises(ConfigError, match="one 'density' for every model"):
        mergekit_file(tmp_path, "b.yaml", {**base, "models": uneven})
    with pytest.raises(ConfigError, match="gradient or a filter"):
        mergekit_file(tmp_path, "c.yaml", {**base, "models": two, "parameters": {"density": [0.2, 0.8]}})
    with pytest.raises(ConfigError, match="slices"):
        mergekit_file(tmp_path, "d.yaml", {**base, "slices": [], "models": two})
    with pytest.raises(ConfigError, match="'rescale'"):
        mergekit_file(tmp_path, "e.yaml", {**base, "models": two, "parameters": {"rescale": True}})


def test_mergekit_breadcrumbs_keeps_mergekits_counts():
    from mtlkit.merging.breadcrumbs import breadcrumb_mask

    tau = torch.arange(1, 101, dtype=torch.float64)
    keep = breadcrumb_mask(tau, 0.0, 0.01, density=0.9)
    assert int(keep.sum()) == 90 and not keep[-1] and not keep[:9].any()
    assert bool(breadcrumb_mask(tau, 0.0, 0.01, density=1.0).all())
    crowded = breadcrumb_mask(tau, 0.0, 0.2, density=0.9)  # both do not fit: fewer from the top
    assert int(crowded.sum()) == 90 and not crowded[-10:].any()
