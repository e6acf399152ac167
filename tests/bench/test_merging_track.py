"""The merging benchmark track: fine-tuning, the joint reference, caching and evaluation, on a
small synthetic task set (fast); the real eight image tasks in the slow suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtlkit.bench.image_tasks import ImageSplit, ImageTask
from mtlkit.bench.merging_track import TrackConfig, build_track, mean, mlp_backbone, normalised
from mtlkit.merging import merge

CONFIG = TrackConfig(shots=5, probe_steps=50, finetune_steps=60, finetune_lr=3e-3, joint_steps=60, batch=32)


def synthetic_tasks() -> dict[str, ImageTask]:
    """A 4-way task (which quadrant is bright), needing a nonlinear feature to separate from the
    pretrained model's (its label pairs are XOR-like: 0/3 are the diagonal, 1/2 the anti-diagonal,
    and the quadrants overlap in intensity), and a 2-way one (is the top half brighter)."""
    g = torch.Generator().manual_seed(0)

    def quadrant(n: int) -> ImageSplit:
        y = torch.randint(0, 4, (n,), generator=g)
        x = 0.5 * torch.rand(n, 28, 28, generator=g)
        for i, q in enumerate(y.tolist()):
            # diagonal pairs (labels 0, 3) or anti-diagonal pairs (1, 2), one of them a bit brighter
            first, second = [(0, 3), (1, 2), (1, 2), (0, 3)][q]
            bright = first if q in (0, 1) else second
            for quad in (first, second):
                r, c = divmod(quad, 2)
                x[i, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14] += 0.25 + 0.1 * (quad == bright)
        return ImageSplit(x, y)

    def halves(n: int) -> ImageSplit:
        y = torch.randint(0, 2, (n,), generator=g)
        x = 0.3 * torch.rand(n, 28, 28, generator=g)
        x[:, :14] += 0.4 * y[:, None, None]
        x[:, 14:] += 0.4 * (1 - y)[:, None, None]
        return ImageSplit(x, y)

    return {
        "quadrant": ImageTask("quadrant", 4, quadrant(400), quadrant(100), quadrant(200)),
        "halves": ImageTask("halves", 2, halves(400), halves(100), halves(200)),
    }


def make() -> nn.Module:
    return mlp_backbone(width=32, features=8)


def build(cache: Path | None = None):
    return build_track(
        "toy", synthetic_tasks(), make, lambda backbone: None, seed=3, config=CONFIG, cache=cache
    )


def test_experts_learn_their_task_and_references_are_consistent() -> None:
    track = build()
    pretrained = track.accuracy(track.pretrained)
    individual = track.accuracy(lambda task: track.experts[task])
    assert individual["quadrant"] > pretrained["quadrant"] + 20
    assert min(individual.values()) > 90
    joint = track.accuracy(track.joint)
    assert joint["quadrant"] > pretrained["quadrant"] + 10 and joint["halves"] >= pretrained["halves"]
    # an expert is scored on its own task: routing to it equals evaluating it alone
    assert individual["halves"] == track.accuracy(track.experts["halves"])["halves"]
    assert normalised(individual, individual) == pytest.approx(100.0)
    # merging one expert with Task Arithmetic at scale 1 gives that expert back
    one = merge(track.pretrained, {"quadrant": track.experts["quadrant"]}, "task_arithmetic", scaling=1.0)
    assert track.accuracy(one.state_dict)["quadrant"] == individual["quadrant"]
    assert mean(track.accuracy(track.pretrained)) == pytest.approx(sum(pretrained.values()) / 2)


def test_heads_are_frozen_and_training_data_feed_data_aware_methods() -> None:
    track = build()
    assert not any(p.requires_grad for p in track.heads.parameters())
    batches = track.batches("halves", examples=70, batch=32, labels=True)
    assert [len(b[1]) for b in batches] == [32, 32, 6]
    assert torch.equal(batches[0][0], track.tasks["halves"].train.images[:32])
    outputs = track.headed(track.experts["halves"])(batches[0][0])
    assert set(outputs) == {"quadrant", "halves"} and outputs["quadrant"].shape == (32, 4)


def test_a_cached_track_reloads_bit_identically(tmp_path: Path) -> None:
    first = build(tmp_path)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and (folders[0] / "done").is_file()
    second = build(tmp_path)
    assert second.seconds == first.seconds  # read from the cache, not retrained
    for name, state in first.experts.items():
        assert all(torch.equal(state[k], second.experts[name][k]) for k in state)
    assert all(torch.equal(v, second.heads.state_dict()[k]) for k, v in first.heads.state_dict().items())
    # an interrupted build (no completion marker) is rebuilt, not half-read
    (folders[0] / "done").unlink()
    third = build(tmp_path)
    assert all(torch.equal(first.joint[k], third.joint[k]) for k in first.joint)


@pytest.mark.slow
def test_the_eight_image_tasks() -> None:
    from mtlkit.bench.image_tasks import TASKS, image_tasks, pretraining_pool

    tasks = image_tasks(seed=1)
    assert tuple(tasks) == TASKS
    sizes = {name: (len(t.train), len(t.val), len(t.test)) for name, t in tasks.items()}
    assert sizes["mnist"] == (6000, 1000, 3000) and sizes["digits"] == (1000, 197, 600)
    assert sizes["fashion"] == (8000, 2000, 5000) and sizes["fashion_vflip"] == (8000, 2000, 5000)
    for task in tasks.values():
        for split in (task.train, task.val, task.test):
            assert split.images.shape[1:] == (28, 28) and float(split.images.min()) >= 0
            assert float(split.images.max()) <= 1 and int(split.labels.max()) < task.num_classes
    # no test image of the MNIST tasks is a training image; the pretraining pool is Fashion's first 50k
    train = {tuple(x.flatten().tolist()) for x in tasks["mnist"].train.images[:500]}
    assert not any(tuple(x.flatten().tolist()) in train for x in tasks["mnist"].test.images)
    pool = pretraining_pool()
    assert len(pool) == 50_000 and not torch.equal(pool.images[-1], tasks["fashion"].train.images[0])
    again = image_tasks(seed=1, tasks=("mnist_small", "fashion_vflip"))
    assert torch.equal(again["mnist_small"].test.images, tasks["mnist_small"].test.images)
    assert torch.equal(again["fashion_vflip"].train.labels, tasks["fashion_vflip"].train.labels)
