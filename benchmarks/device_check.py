"""Checks that need a GPU (run on a lent machine; CI has none).

1. Engine paths on CUDA equal a brute-force per-task loop (float64).
2. The Trainer on CUDA: fp16 + GradScaler and bf16 autocast with MGDA; a run resumed from its
   epoch-1 checkpoint ends with the weights of an uninterrupted run.
3. Step cost on CUDA, loop vs batched per-task gradients, to set ``default_strategy``.

usage: PYTHONPATH=src python benchmarks/device_check.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import mtlkit as mk
from step_cost import make_step

DEV = torch.device("cuda")


def engine_errors() -> dict[str, float]:
    out = {}
    for model_name in ("shared_bottom", "mmoe"):
        torch.manual_seed(0)
        tasks = mk.TaskSet([mk.Task(f"t{i}") for i in range(4)])
        net = mk.models.create(model_name, in_features=5, tasks=tasks).to(DEV, torch.float64)
        x = torch.randn(32, 5, device=DEV, dtype=torch.float64)
        y = {t: torch.randn(32, device=DEV, dtype=torch.float64) for t in tasks.names}
        rows, reps = [], []
        for t in tasks.names:
            net.zero_grad(set_to_none=True)
            out = net(x, full_output=True)
            losses = tasks.losses(out.predictions, y)
            z = out.representation
            z.retain_grad()
            losses[t].backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()]))
            reps.append(z.grad.reshape(-1).clone())
        J, H = torch.stack(rows), torch.stack(reps)
        for strategy in ("loop", "batched"):
            g, _ = mk.GradientEngine(strategy).parameter_gramian(
                list(tasks.losses(net(x), y).values()),
                net.shared_parameters(),
                net.task_parameters(),
            )
            out[f"{model_name}/param/{strategy}"] = float((g - J @ J.T).abs().max())
        out = net(x, full_output=True)
        g, _ = mk.GradientEngine().representation_gramian(
            list(tasks.losses(out.predictions, y).values()),
            out.representation,
            tasks.names,
            net.task_parameters(),
        )
        out[f"{model_name}/rep"] = float((g - H @ H.T).abs().max())
    return out


def trainer_checks(root: Path) -> dict[str, object]:
    splits = mk.data.load_mmoe_synthetic(n_train=2048, n_val=512, n_test=512, dim=32, seed=0)
    out: dict[str, object] = {}

    def trainer(log_dir, amp=False, level="representation"):
        torch.manual_seed(0)
        model = mk.models.MMoE(32, splits.tasks, num_experts=4, expert_dims=[32], tower_dims=[16])
        return mk.Trainer(
            model,
            splits.tasks,
            mk.methods.MGDA(level=level),
            device="cuda",
            log_dir=log_dir,
            amp=amp,
            progress=False,
            tensorboard=False,
            seed=3,
        )

    for amp in ("fp16", "bf16"):
        for level in ("parameter", "representation"):
            tr = trainer(root / f"amp-{amp}-{level}", amp=amp, level=level)
            tr.fit(mk.data.loader(splits.train, 128, shuffle=True), mk.data.loader(splits.val, 512), epochs=2)
            rep = tr.evaluate(mk.data.loader(splits.test, 512))
            out[f"amp {amp} {level}"] = {
                "finite": all(bool(torch.isfinite(p).all()) for p in tr.model.parameters()),
                "device": str(next(tr.model.parameters()).device),
                "test_mse": {t: rep.metrics[t]["mse"] for t in rep.metrics},
                "scale": float(tr.scaler.get_scale()) if tr.scaler is not None else None,
            }
    torch.use_deterministic_algorithms(True)
    full = trainer(root / "full")
    full.fit(mk.data.loader(splits.train, 128, shuffle=True), epochs=2)
    part = trainer(root / "part")
    part.fit(mk.data.loader(splits.train, 128, shuffle=True), epochs=1)
    resumed = trainer(root / "part")  # a new process would do the same: read the latest checkpoint
    resumed.fit(mk.data.loader(splits.train, 128, shuffle=True), epochs=2)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    out["resume_identical"] = all(torch.equal(a[k], b[k]) for k in a)
    out["resume_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    torch.use_deterministic_algorithms(False)
    return out


def step_cost(ks=(2, 10, 40), steps=30, warmup=5) -> dict[str, dict[str, float]]:
    configs = ["sum", "floor", "mtlkit:ew", "mtlkit:mgda-loop", "mtlkit:mgda-batched", "mtlkit:mgda-rep"]
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        row = {}
        for c in configs:
            step = make_step(c, k, "cuda")
            for _ in range(warmup):
                step()
            torch.cuda.synchronize()
            times = []
            for _ in range(steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            row[c] = statistics.median(times)
        out[f"K={k}"] = row
    return out


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    results["engine_max_abs_error"] = engine_errors()
    print(json.dumps(results, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["trainer"] = trainer_checks(Path(tmp))
    print(json.dumps(results["trainer"], indent=1), flush=True)
    results["step_cost_ms"] = step_cost()
    print(json.dumps(results["step_cost_ms"], indent=1), flush=True)
    (out_dir / "device_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
