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
    assert "scaling | 0.5 |" in (tmp_path / "merged" / "model.md").read_text()


def test_a_mergekit_config_is_translated(tmp_path):
    write_family(tmp_path, tasks=2)
    mergekit = {
        "merge_method": "dare_ties",
        "base_model": "base.safetensors",
        "models": [
            {"model": "task0.safetensors", "parameters": {"weight": 0.7, "density": 0.4}},
            {"model": "task1.safetensors", "parameters": {"weight": 0.3, "density": 0.4}},
        ],
        "parameters": {"lambda": 0.9},
    }
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mergekit))
    cfg = load_merge_config(tmp_path / "mk.yaml")
    assert cfg.method == "dare" and cfg.source == "mergekit"
    assert cfg.options == {
        "combine": "ties",
        "rescale": "l1",
        "weights": [0.7, 0.3],
        "scaling": 0.9,
        "drop_rate": pytest.approx(0.6),
    }
    assert list(cfg.experts) == ["task0", "task1"]
    mergekit["merge_method"] = "nuslerp"
    (tmp_path / "mk2.yaml").write_text(yaml.safe_dump(mergekit))
    with pytest.raises(UnknownNameError, match="merge_method"):
        load_merge_config(tmp_path / "mk2.yaml")
    mergekit["merge_method"] = "ties"
    mergekit["models"][1]["parameters"]["density"] = 0.5
    (tmp_path / "mk3.yaml").write_text(yaml.safe_dump(mergekit))
    with pytest.raises(ConfigError, match="one 'density' for every model"):
        load_merge_config(tmp_path / "mk3.yaml")
    mergekit["models"][1]["parameters"] = {"weight": 1.0, "density": 0.4, "int8_mask": True}
    (tmp_path / "mk4.yaml").write_text(yaml.safe_dump(mergekit))
    with pytest.raises(ConfigError, match="int8_mask"):
        load_merge_config(tmp_path / "mk4.yaml")
