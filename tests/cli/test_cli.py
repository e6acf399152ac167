import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtlkit.cli.main import app
from mtlkit.errors import ConfigError
from mtlkit.train.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    import mtlkit as mk

    mk.methods.create(cfg.method.name, **cfg.method.options)  # the options are the method's own


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trainer": {"epoch": 3}}, r"Unknown config key 'trainer.epoch'. Did you mean trainer.epochs\?"),
        ({"trainer": {"epochs": "three"}}, r"trainer.epochs: expected an integer"),
        ({"optimizer": {"lr": "fast"}}, r"optimizer.lr: expected a number"),
        ({"modle": {}}, r"Unknown config key 'modle'. Did you mean model\?"),
        ({"trainer": {"early_stopping": {"patiance": 2}}}, r"trainer.early_stopping.patiance"),
        ({"trainer": {"grad_clip": [1]}}, r"trainer.grad_clip"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, data))


def test_list_commands():
    out = runner.invoke(app, ["methods"]).output
    assert "ew" in out and "mgda" in out and "Sener & Koltun" in out
    assert "mmoe" in runner.invoke(app, ["models"]).output
    assert "census_income" in runner.invoke(app, ["datasets"]).output


def test_train_command_end_to_end(tmp_path):
    cfg = load_config(ROOT / "configs" / "synthetic_mmoe_mgda_ub.yaml").to_dict()
    cfg["data"]["options"].update(n_train=512, n_val=128, n_test=128)
    cfg["trainer"].update(progress=False, tensorboard=False)
    cfg["output"] = str(tmp_path / "run")
    result = runner.invoke(app, ["train", str(write(tmp_path, cfg)), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "y1: mse=" in result.output
    assert (tmp_path / "run" / "test_report.json").exists() and (tmp_path / "run" / "run.json").exists()


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """The installed command line in a fresh process (errors print as one line, exit status 2)."""
    return subprocess.run(
        [sys.executable, "-m", "mtlkit.cli.main", *args], capture_output=True, text=True, cwd=cwd
    )


def test_errors_exit_with_one_clear_line(tmp_path):
    bad = write(tmp_path, {"method": {"name": "mdga"}, "data": {"name": "mmoe_synthetic"}})
    proc = cli("train", str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: Unknown method 'mdga'. Did you mean 'mgda'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_refuses_a_bad_suite_with_one_clear_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: x\nseeds: [0]\nmethods: [pcgard]\n"
        "datasets: [{name: mmoe_synthetic, architectures: [shared_bottom]}]\n"
    )
    proc = cli("bench", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "pcgrad" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"data": {"batch_size": 0}}, r"data.batch_size must be >= 1"),
        ({"optimizer": {"lr": -0.1}}, r"optimizer.lr must be > 0"),
        ({"optimizer": {"name": "adamm"}}, r"Did you mean 'adam'"),
        ({"trainer": {"device": "cuad"}}, r"trainer.device: 'cuad' is not a device"),
        ({"trainer": {"epochs": -3}}, r"trainer.epochs must be >= 0"),
        ({"trainer": {"checkpoint_every": 0}}, r"trainer.checkpoint_every must be >= 1"),
        ({"trainer": {"amp": "fp8"}}, r"trainer.amp must be"),
        ({"trainer": {"early_stopping": {"patience": 0}}}, r"patience must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"data": {"name": "mmoe_synthetic", "options": {"n_trian": 10}}},
            r"data.options.n_trian. Did you mean 'n_train'",
        ),
        (
            {"model": {"name": "mmoe", "options": {"num_expert": 2}}},
            r"model.options.num_expert. Did you mean 'num_experts'",
        ),
        ({"model": {"name": "mmoe", "options": {"tasks": []}}}, r"set by the run itself"),
        ({"method": {"name": "famo", "options": {"gama": 0.1}}}, r"method.options.*Did you mean 'gamma'"),
        ({"method": {"name": "famo", "options": {"gamma": -1}}}, r"gamma must be a number >= 0"),
        ({"method": {"name": "mdga"}}, r"Did you mean 'mgda'"),
    ],
)
def test_component_options_are_checked_before_any_data_is_loaded(tmp_path, monkeypatch, data, message):
    import mtlkit as mk

    original = mk.data.DATASETS.get("mmoe_synthetic")

    @functools.wraps(original)
    def forbidden(**kwargs):
        raise AssertionError("the dataset was loaded before the configuration was checked")

    monkeypatch.setitem(mk.data.DATASETS._entries, "mmoe_synthetic", forbidden)
    data = {"data": {"name": "mmoe_synthetic"}, **data}
    result = runner.invoke(app, ["train", str(write(tmp_path, data))])
    assert isinstance(result.exception, mk.errors.MtlkitError), result.exception
    assert __import__("re").search(message, str(result.exception)), str(result.exception)


def test_cli_overrides_are_validated_and_checkpoint_every_is_settable(tmp_path):
    path = write(tmp_path, {"trainer": {"epochs": 2}})
    with pytest.raises(ConfigError, match="trainer.epochs must be >= 0"):
        load_config(path, {"trainer.epochs": -3})
    assert load_config(path, {"trainer.checkpoint_every": 7}).trainer.checkpoint_every == 7
    cfg = load_config(ROOT / "configs" / "synthetic_mmoe_mgda_ub.yaml").to_dict()
    cfg["data"]["options"].update(n_train=256, n_val=64, n_test=64)
    cfg["trainer"].update(progress=False, tensorboard=False)
    cfg["output"] = str(tmp_path / "run")
    result = runner.invoke(
        app, ["train", str(write(tmp_path, cfg)), "--epochs", "1", "--checkpoint-every", "1"]
    )
    assert result.exit_code == 0, result.output
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert steps == ["step-00000002", "step-00000002-end"]  # one every step, the last two kept


def test_infinite_values_and_non_string_option_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="optimizer.lr must be a finite number"):
        load_config(write(tmp_path, {"optimizer": {"lr": float("inf")}}))
    with pytest.raises(ConfigError, match="option names must be strings"):
        load_config(write(tmp_path, {"method": {"name": "ew", "options": {1: 2}}}))
