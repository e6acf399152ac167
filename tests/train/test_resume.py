"""A run killed with SIGKILL at an arbitrary step resumes to exactly the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

JOB = Path(__file__).with_name("resume_job.py")
ROOT = Path(__file__).resolve().parents[2]


def run_job(run_dir: Path, out: Path, delay: float = 0.0, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(JOB), str(run_dir), str(out), str(delay)], env=env)
    if wait:
        assert proc.wait(timeout=300) == 0
    return proc


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return -1
    return int(pointer.read_text().strip().split("-")[1])


@pytest.mark.parametrize(
    "kill_after", [4, 13]
)  # mid-epoch, and just after an epoch boundary (10 steps/epoch)
def test_killed_run_resumes_to_identical_weights(tmp_path, kill_after):
    ref_out = tmp_path / "reference.safetensors"
    run_job(tmp_path / "reference", ref_out)

    run_dir, out = tmp_path / "killed", tmp_path / "resumed.safetensors"
    proc = run_job(run_dir, out, delay=0.05, wait=False)
    deadline = time.time() + 240
    while latest_step(run_dir) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert 0 <= latest_step(run_dir) < 30

    run_job(run_dir, out)  # resumes from the latest checkpoint
    ref, got = load_file(str(ref_out)), load_file(str(out))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    steps = (run_dir / "steps.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in steps] == list(range(1, 31))  # no duplicated or missing rows
    # the epoch log (mean training losses, validation metrics) is the uninterrupted run's, exactly
    assert (run_dir / "epochs.csv").read_text() == (tmp_path / "reference" / "epochs.csv").read_text()
