"""Negative transfer between diffusion noise levels, on a two-dimensional toy (ANT's O1 and O2).

After Go, Kim, Park, Lee, Ye, Hwang, Kim, "Addressing Negative Transfer in Diffusion Models",
NeurIPS 2023. A denoising diffusion model is a multi-task model: one noise-prediction task per
timestep interval, all served by one network. The paper observes

- **O1**: the affinity between two denoising tasks (the cosine of their gradients) falls as the gap
  between their noise levels grows;
- **O2**: ordinary diffusion training shows negative transfer: a specialist trained on one interval
  only predicts that interval's noise better than the jointly trained model, with the same samples
  and steps. On this toy it is concentrated at the high noise levels (where the best prediction is
  nearly ``x_t`` itself and the joint model's compromise costs most); the middle intervals show a
  slight positive transfer instead.

Here the data are a mixture of eight Gaussians on a circle in the plane, the denoiser a small MLP
with a sinusoidal timestep embedding, the schedule DDPM's linear one (T = 1000) split into k = 5
uniform intervals; training is mtlkit's Trainer with the interval tasks of
:class:`~mtlkit.data.DiffusionLoader` (the joint model: equal weights; a specialist: AGD's weighted
schedule with all weight on its interval, as the benchmark on Fashion-MNIST,
``benchmarks/ant_diffusion.py``, does). The affinity comes from
:func:`mtlkit.relatedness.timestep_affinity`. A toy reconstruction of the paper's observations at
CPU scale, not its DiT experiments.

    python examples/ant_negative_transfer.py --out runs/ant_negative_transfer.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import mtlkit as mk
from mtlkit.core.figures import pyplot, save_figure
from mtlkit.core.intervals import uniform_intervals

K, BATCH = 5, 100
AFFINITY_STEPS = [10, 60, 120, 200, 300, 400, 500, 600, 700, 800, 900, 990]


def ring(n: int, seed: int) -> Tensor:
    """``n`` points of a mixture of eight Gaussians (sd 0.05) on the unit circle."""
    gen = torch.Generator().manual_seed(seed)
    angle = torch.randint(0, 8, (n,), generator=gen).double() * (2 * math.pi / 8)
    centres = torch.stack([angle.cos(), angle.sin()], dim=1)
    return (centres + 0.05 * torch.randn(n, 2, generator=gen, dtype=torch.float64)).float()


class Denoiser(nn.Module):
    """An MLP noise predictor for points in the plane; every interval task reads its output."""

    def __init__(self, tasks: mk.TaskSet, width: int = 128, frequencies: int = 8) -> None:
        super().__init__()
        self.task_names = list(tasks.names)
        self.register_buffer("frequencies", torch.exp(torch.linspace(0, math.log(30.0), frequencies)))
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * frequencies, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 2),
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [] for t in self.task_names}

    def forward(self, inputs: dict[str, Tensor], full_output: bool = False):  # type: ignore[no-untyped-def]
        phase = inputs["t"].float()[:, None] / 1000.0 * self.frequencies[None, :]
        eps = self.net(torch.cat([inputs["x"], phase.sin(), phase.cos()], dim=1))
        predictions = {t: eps for t in self.task_names}
        return mk.MultiTaskOutput(predictions, eps) if full_output else predictions


def train(
    data: Tensor, specialist: int | None, seed: int, epochs: int
) -> tuple[Denoiser, mk.data.NoiseSchedule, list[tuple[int, int]]]:
    intervals = uniform_intervals(1000, K)
    schedule = mk.data.NoiseSchedule()
    batches = [b for b in data.split(BATCH) if len(b) == BATCH]
    loader = mk.data.DiffusionLoader(batches, intervals, schedule, seed=seed)
    torch.manual_seed(seed)
    model = Denoiser(loader.tasks)
    if specialist is None:
        method = mk.methods.create("ew")
    else:  # only this interval's chunk of each batch contributes
        weights = [1.0 if j == specialist else 0.0 for j in range(K)]
        method = mk.methods.create("agd", schedule="weighted", weights=weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    trainer = mk.Trainer(
        model, loader.tasks, method, optimizer, device="cpu", progress=False, seed=seed, tensorboard=False
    )
    trainer.fit(loader, epochs=epochs)
    return model, schedule, intervals


def interval_losses(model: Denoiser, test: Tensor, schedule: mk.data.NoiseSchedule, intervals) -> list[float]:  # type: ignore[no-untyped-def]
    """Held-out noise-prediction loss per interval (one fixed draw per point and interval)."""
    gen = torch.Generator().manual_seed(12345)
    out = []
    model.eval()
    with torch.no_grad():
        for lo, hi in intervals:
            t = torch.randint(lo, hi + 1, (len(test),), generator=gen)
            noise = torch.randn(test.shape, generator=gen)
            eps = model({"x": schedule.noisy(test, t, noise), "t": t})[model.task_names[0]]
            out.append(float(torch.nn.functional.mse_loss(eps, noise)))
    return out


def run(seed: int = 0, n: int = 4000, epochs: int = 20) -> dict[str, object]:
    """The joint model, one specialist per interval, their held-out losses and the joint model's
    timestep affinity."""
    data, test = ring(n, seed), ring(2000, 10_000 + seed)
    joint, schedule, intervals = train(data, None, seed, epochs)
    joint_losses = interval_losses(joint, test, schedule, intervals)
    specialist_losses = []
    for j in range(K):
        model, _, _ = train(data, j, seed, epochs)
        specialist_losses.append(interval_losses(model, test, schedule, intervals)[j])
    affinity = mk.relatedness.timestep_affinity(joint, [test[:500], test[500:1000]], schedule, AFFINITY_STEPS)
    rho, gaps, means = mk.relatedness.affinity_decay(affinity, AFFINITY_STEPS)
    return {
        "intervals": intervals,
        "joint": joint_losses,
        "specialist": specialist_losses,
        "affinity": affinity,
        "rho": rho,
        "gaps": gaps,
        "gap_means": means,
    }


def figure(result: dict, path: Path) -> Path:  # type: ignore[type-arg]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    image = left.imshow(result["affinity"], cmap="viridis", vmin=-1, vmax=1)
    left.set_xticks(range(len(AFFINITY_STEPS)), AFFINITY_STEPS, rotation=90, fontsize=7)
    left.set_yticks(range(len(AFFINITY_STEPS)), AFFINITY_STEPS, fontsize=7)
    left.set_title(f"O1: gradient cosine between timesteps (Spearman with the gap {result['rho']:+.2f})")
    fig.colorbar(image, ax=left)
    names = [f"{lo}-{hi}" for lo, hi in result["intervals"]]
    x = np.arange(K)
    right.bar(x - 0.2, result["joint"], 0.4, label="joint model")
    right.bar(x + 0.2, result["specialist"], 0.4, label="specialist (its interval only)")
    right.set_xticks(x, names)
    right.set(
        yscale="log",
        xlabel="timestep interval",
        ylabel="held-out noise-prediction loss",
        title="O2: negative transfer",
    )
    right.legend()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/ant_negative_transfer.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args.seed, epochs=args.epochs)
    print(f"O1: Spearman correlation of the gradient cosine with the timestep gap: {result['rho']:+.3f}")
    print("O2: held-out loss per interval (joint / specialist / gap %)")
    for (lo, hi), a, b in zip(result["intervals"], result["joint"], result["specialist"], strict=True):  # type: ignore[call-overload]
        print(f"  [{lo:3d}, {hi:3d}]  {a:.4f}  {b:.4f}  {100 * (a - b) / b:+.1f}%")
    print(f"wrote {figure(result, args.out)}")


if __name__ == "__main__":
    main()
