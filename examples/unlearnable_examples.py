"""Unlearnable examples against a multi-task model (MTL-UE style), as an evaluation of the trained model.

After Yu, Xia, Yang, Kong, Yang, Lu, Tan, Kot, "MTL-UE: Learning to Learn Nothing for Multi-Task
Learning", ICML 2025. An unlearnable-examples attack adds a small perturbation (here at most 8/255
per pixel) to every training image so that a model trained on the released data learns a shortcut
and fails on clean test data. MTL-UE's perturbations carry a label prior for every task (a
class-wise embedding per task), with the tasks' priors kept from repeating each other. The
evaluation trains a multi-task model with a chosen mtlkit method on clean, randomly perturbed and
unlearnable training data and reports each task's accuracy on the clean test split, and its drop
against clean training. Three kinds of training data:

- ``clean``: the data as they are;
- ``random``: a fresh random sign pattern of amplitude 8/255 per image (the control: the same
  budget, no label information);
- ``class_wise``: MTL-UE's two ingredients in their simplest, fixed form (a **simplification, not
  MTL-UE's learned generator**): a random sign pattern per (task, class), constant on 4 x 4
  patches (the synthetic shortcuts of Yu et al., KDD 2022), the two tasks on the two colours of a
  checkerboard of patches (orthogonal priors, so no redundancy between tasks), summed over an
  image's labels.

Any other perturbation plugs in as a tensor: :func:`clean_test_accuracy` takes the training
set's perturbation and checks the budget. MTL-UE's generator itself (an image encoder, class
embeddings per task with intra- and inter-task cosine regularisers, trained with error-minimising
noise against a surrogate) is not included: a CPU-scale reconstruction of it let the surrogate fit
the perturbed training set by memorising it and left the evaluated model's clean accuracy
unchanged, so it would not show the effect here.

The data are Multi-Fashion (two Fashion-MNIST items overlaid, tasks ``left`` and ``right``; needs
``make data-images``), a subset of its training pairs; the model is MTAN with BatchNorm (mtlkit's
``mtan``). ``--model lenet`` shows the other side: MultiLeNet, without normalisation, learns the
clothes and ignores a pattern of this size.

    python examples/unlearnable_examples.py --out runs/unlearnable_examples.png
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import mtlkit as mk
from mtlkit.core.figures import pyplot, save_figure
from mtlkit.data.base import MultiTaskTensorDataset, loader

EPSILON = 8 / 255
TASKS = ("left", "right")
CLASSES = 10
KINDS = ("clean", "random", "class_wise")


def multi_fashion(
    n_train: int, n_test: int, seed: int = 0
) -> tuple[MultiTaskTensorDataset, MultiTaskTensorDataset]:
    """The first ``n_train`` training and ``n_test`` test pairs of Multi-Fashion (seeded build)."""
    data = mk.data.load_multi_fashion(seed)
    if not 0 < n_train <= len(data.train) or not 0 < n_test <= len(data.test):
        raise ValueError(f"n_train must be in 1..{len(data.train)} and n_test in 1..{len(data.test)}.")
    return subset(data.train, n_train), subset(data.test, n_test)


def subset(data: MultiTaskTensorDataset, n: int) -> MultiTaskTensorDataset:
    return MultiTaskTensorDataset(data.inputs[:n], {t: data.targets[t][:n] for t in TASKS})


def task_set() -> mk.TaskSet:
    return mk.TaskSet([mk.Task(t, loss="ce", metrics=["accuracy"]) for t in TASKS])


def create_model(name: str, shape: tuple[int, ...], seed: int) -> mk.models.MultiTaskModule:
    torch.manual_seed(seed)
    return mk.models.create(name, in_features=shape, tasks=task_set(), out_features=CLASSES)


# -- perturbations --------------------------------------------------------------------------------


def random_noise(inputs: Tensor, seed: int = 0) -> Tensor:
    """A fresh sign pattern of amplitude ``EPSILON`` per image: the label-free control."""
    gen = torch.Generator().manual_seed(seed + 2)
    return EPSILON * (torch.randint(0, 2, inputs.shape, generator=gen).float() * 2 - 1)


def class_wise_patterns(shape: tuple[int, ...], seed: int = 0, patch: int = 4) -> dict[str, Tensor]:
    """``{task: (CLASSES, *shape)}``: a random sign per ``patch`` x ``patch`` block and class,
    task ``k`` on the blocks whose row + column index is ``k`` modulo the number of tasks."""
    gen = torch.Generator().manual_seed(seed + 1)
    rows, cols = -(-shape[1] // patch), -(-shape[2] // patch)
    board = (torch.arange(rows)[:, None] + torch.arange(cols)[None, :]) % len(TASKS)
    patterns = {}
    for k, task in enumerate(TASKS):
        signs = torch.randint(0, 2, (CLASSES, shape[0], rows, cols), generator=gen).float() * 2 - 1
        blocks = signs * (board == k).float()
        patterns[task] = (
            EPSILON * F.interpolate(blocks, scale_factor=patch, mode="nearest")[..., : shape[1], : shape[2]]
        )
    return patterns


def class_wise_noise(targets: Mapping[str, Tensor], patterns: Mapping[str, Tensor]) -> Tensor:
    """Each image's perturbation: the sum of its classes' patterns (disjoint blocks, so <= EPSILON)."""
    return torch.stack([patterns[t][targets[t]] for t in TASKS]).sum(0)


def perturbation(kind: str, data: MultiTaskTensorDataset, seed: int = 0) -> Tensor:
    """The ``kind`` perturbation of every training image."""
    x = data.inputs
    if kind == "clean":
        return torch.zeros_like(x)
    if kind == "random":
        return random_noise(x, seed)
    if kind == "class_wise":
        return class_wise_noise(data.targets, class_wise_patterns(tuple(x.shape[1:]), seed))
    raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(KINDS)}.")


def clean_test_accuracy(
    train: MultiTaskTensorDataset,
    test: MultiTaskTensorDataset,
    delta: Tensor,
    model: str,
    method: str,
    seed: int = 0,
    epochs: int = 3,
) -> dict[str, float]:
    """Per-task clean test accuracy of ``model`` trained with ``method`` on ``train + delta``."""
    if delta.shape != train.inputs.shape:
        raise ValueError(
            f"the perturbation has shape {tuple(delta.shape)}, the images {tuple(train.inputs.shape)}."
        )
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("the perturbation has NaN or infinite values.")
    if float(delta.abs().max()) > EPSILON + 1e-6:
        raise ValueError(f"the perturbation exceeds the budget of {EPSILON:.4f} per pixel.")
    released = MultiTaskTensorDataset((train.inputs + delta).clamp(0, 1), train.targets)
    net = create_model(model, tuple(train.inputs.shape[1:]), seed)
    trainer = mk.Trainer(
        net, task_set(), method, torch.optim.Adam(net.parameters(), 1e-3), device="cpu", progress=False,
        seed=seed, tensorboard=False,
    )  # fmt: skip
    trainer.fit(
        loader(released, 64, shuffle=True, generator=torch.Generator().manual_seed(seed)), epochs=epochs
    )
    report = trainer.evaluate(loader(test, 1000))
    return {t: float(report.metrics[t]["accuracy"]) for t in TASKS}


def run(
    methods: tuple[str, ...] = ("ew", "mgda"),
    kinds: tuple[str, ...] = KINDS,
    model: str = "mtan",
    n_train: int = 10_000,
    n_test: int = 4_000,
    epochs: int = 3,
    seed: int = 0,
) -> dict:
    """Every (method, kind) pair's clean test accuracy per task, and a few perturbations to show."""
    train, test = multi_fashion(n_train, n_test, seed)
    result: dict = {"accuracy": {m: {} for m in methods}, "examples": {}, "model": model}
    for kind in kinds:
        delta = perturbation(kind, train, seed)
        result["examples"][kind] = delta[:4]
        for method in methods:
            result["accuracy"][method][kind] = clean_test_accuracy(
                train, test, delta, model, method, seed, epochs
            )
    result["images"] = train.inputs[:4]
    return result


def figure(result: dict, path: Path) -> Path:
    plt = pyplot()
    accuracy = result["accuracy"]
    methods, kinds = list(accuracy), list(next(iter(accuracy.values())))
    fig = plt.figure(figsize=(4.5 * len(methods) + 4.5, 3.8))
    grid = fig.add_gridspec(1, len(methods) + 1)
    for i, method in enumerate(methods):
        ax = fig.add_subplot(grid[0, i])
        for j, task in enumerate(TASKS):
            values = [accuracy[method][kind][task] for kind in kinds]
            ax.bar([k + 0.4 * j - 0.2 for k in range(len(kinds))], values, 0.4, label=task)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set(title=f"trained with {method}", ylim=(0, 1), ylabel="clean test accuracy" if i == 0 else None)
        ax.grid(alpha=0.3, axis="y")
        if i == 0:
            ax.legend(loc="lower left")
    inner = grid[0, -1].subgridspec(2, len(kinds))
    for k, kind in enumerate(kinds):
        image, delta = result["images"][0, 0], result["examples"][kind][0, 0]
        top, bottom = fig.add_subplot(inner[0, k]), fig.add_subplot(inner[1, k])
        top.imshow((image + delta).clamp(0, 1), cmap="gray", vmin=0, vmax=1)
        bottom.imshow(delta, cmap="coolwarm", vmin=-EPSILON, vmax=EPSILON)
        top.set_title(kind, fontsize=8)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"Training data perturbed within {EPSILON * 255:.0f}/255, tested clean (Multi-Fashion, {result['model']})"
    )
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["ew", "mgda"])
    parser.add_argument("--model", default="mtan")
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/unlearnable_examples.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(tuple(args.methods), KINDS, args.model, args.n_train, 4_000, args.epochs, args.seed)
    print(f"{args.model}: clean test accuracy by training data (drop against clean training)")
    print("| method | training data | " + " | ".join(TASKS) + " |")
    print("|---|---|" + "---:|" * len(TASKS))
    for method, rows in result["accuracy"].items():
        for kind, row in rows.items():
            cells = [f"{row[t]:.4f} ({row[t] - rows['clean'][t]:+.4f})" for t in TASKS]
            print(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    print(f"wrote {figure(result, args.out)}")


if __name__ == "__main__":
    main()
