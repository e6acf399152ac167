"""On a GPU: every loss weighting trains under the Trainer on CUDA and resumes exactly.

For each method, an uninterrupted 4-epoch run is compared with (a) a run stopped after epoch 2 and
resumed from its end-of-epoch checkpoint and (b) a run that crashes mid-epoch 3 and resumes from a
mid-epoch checkpoint: model weights and method state must be bit-identical. This is where a method
state restored onto the CPU next to CUDA losses would fail.

usage: python benchmarks/device_check_weightings.py --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch

import mtlkit as mk

METHODS = {
    "ew": {},
    "si": {},
    "gls": {},
    "uw": {},
    "imtl_l": {},
    "dwa": {},
    "rlw": {},
    "gradnorm": {},
    "famo": {},
    "stch": {"warmup_epochs": 2},
}


class Crash(RuntimeError):
    pass


class CrashingLoader:
    def __init__(self, inner, crash_at):
        self.inner, self.crash_at, self.seen = inner, crash_at, 0
        self.generator = getattr(inner, "generator", None)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            if self.seen == self.crash_at:
                raise Crash
            self.seen += 1
            yield batch


def trainer(data, name, out, **kw):
    torch.manual_seed(0)
    model = mk.models.MMoE(12, data.tasks, num_experts=3, expert_dims=[16], tower_dims=[8])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = mk.methods.create(name, **METHODS[name])
    return mk.Trainer(
        model,
        data.tasks,
        method,
        opt,
        device="cuda",
        log_dir=out,
        progress=False,
        tensorboard=False,
        seed=3,
        **kw,
    )


def same(a, b) -> bool:
    ok = all(
        torch.equal(x, y)
        for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    )
    return ok and repr(a.method.state_dict()) == repr(b.method.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = mk.data.load_mmoe_synthetic(n_train=384, n_val=128, n_test=128, dim=12, seed=1)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "methods": {}}
    for name in METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            loader = lambda: mk.data.loader(data.train, 64, shuffle=True)  # noqa: E731
            ref = trainer(data, name, tmp / "ref")
            ref.fit(loader(), epochs=4)
            first = trainer(data, name, tmp / "a")
            first.fit(loader(), epochs=2)
            resumed = trainer(data, name, tmp / "a")
            resumed.fit(loader(), epochs=4)
            crashed = trainer(data, name, tmp / "b", checkpoint_every=4)
            with contextlib.suppress(Crash):
                crashed.fit(CrashingLoader(loader(), 17), epochs=4)
            again = trainer(data, name, tmp / "b", checkpoint_every=4)
            again.fit(loader(), epochs=4)
            row = {
                "end_of_epoch_resume_identical": same(ref, resumed),
                "mid_epoch_resume_identical": same(ref, again),
                "final_weights": ref.last_info.weights.tolist(),
            }
        results["methods"][name] = row
        print(name, row, flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
