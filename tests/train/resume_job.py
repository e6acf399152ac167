"""Training job used by the kill-and-resume test (run as a subprocess).

usage: python resume_job.py RUN_DIR OUT_FILE [STEP_DELAY_SECONDS]
"""

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import mtlkit as mk


class SlowLoader:
    """A DataLoader wrapper that sleeps after each batch, so the test can kill mid-run."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay
        self.generator = inner.generator

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            yield batch
            time.sleep(self.delay)


def main() -> None:
    run_dir, out_file = Path(sys.argv[1]), Path(sys.argv[2])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    splits = mk.data.load_mmoe_synthetic(n_train=640, n_val=128, n_test=128, correlation=0.3, dim=16, seed=3)
    model = mk.models.MMoE(16, splits.tasks, num_experts=3, expert_dims=[16], tower_dims=[8], dropout=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    trainer = mk.Trainer(
        model,
        splits.tasks,
        mk.methods.MGDA(level="representation"),
        opt,
        sched,
        device="cpu",
        log_dir=run_dir,
        checkpoint_every=1,
        progress=False,
        log_every=1,
        tensorboard=False,
        seed=7,
    )
    train = SlowLoader(mk.data.loader(splits.train, batch_size=64, shuffle=True), delay)
    trainer.fit(train, mk.data.loader(splits.val, batch_size=128), epochs=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_file))


if __name__ == "__main__":
    main()
