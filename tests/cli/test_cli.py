import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtlkit.cli.config import RunConfig, load_config
from mtlkit.cli.main import app
from mtlkit.errors import ConfigError

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


def test_errors_exit_with_one_clear_line(tmp_path):
    bad = write(tmp_path, {"method": {"name": "mdga"}, "data": {"name": "mmoe_synthetic"}})
    proc = subprocess.run(
        [sys.executable, "-m", "mtlkit.cli.main", "train", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "error: Unknown method 'mdga'. Did you mean 'mgda'" in proc.stderr
    assert "Traceback" not in proc.stderr
