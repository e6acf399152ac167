"""IMP's modality-agnostic MoE encoder: modalities recognised by shape, only the input modality's
tasks predicted, and one-task-per-step (AGD) multi-input training on real digit images beside a
vector regression task, with per-modality expert usage in the logs."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.data import MultiTaskTensorDataset

TASKS = mk.TaskSet([mk.Task("digit", "ce", metrics=["accuracy"]), mk.Task("sines", "mse")])


def _model() -> mk.models.IMPEncoder:
    torch.manual_seed(0)
    return mk.models.IMPEncoder(
        None,
        TASKS,
        out_features={"digit": 10, "sines": 1},
        modalities={"image": (1, 8, 8), "vector": 16},
        task_modality={"digit": "image", "sines": "vector"},
        dim=32,
        depth=2,
        patch_size=2,
        num_experts=4,
        top_k=1,
    )


def test_the_modality_is_recognised_by_shape_and_only_its_tasks_are_predicted():
    model = _model()
    assert list(model(torch.randn(3, 1, 8, 8))) == ["digit"]
    assert list(model(torch.randn(3, 16))) == ["sines"]
    with pytest.raises(mk.errors.ShapeMismatchError, match="image"):
        model(torch.randn(3, 12))
    with pytest.raises(mk.errors.ShapeMismatchError, match="none of the tasks"):
        model(torch.randn(3, 16), task="digit")  # a vector for the image task
    with pytest.raises(mk.errors.ConfigError, match="share one"):
        mk.models.IMPEncoder(
            None, ["a", "b"], modalities={"x": 4, "y": 4}, task_modality={"a": "x", "b": "y"}
        )
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.tokenizers.parameters())  # the tokenizers are shared


def test_alternating_task_steps_train_both_modalities():
    images, labels = mk.data.load_digits_8x8()
    images = images.float().div(16.0).unsqueeze(1)
    x, y, _ = mk.data.mmoe_synthetic(n=1200, dim=16, seed=0)
    digits = MultiTaskTensorDataset(images[:1500], {"digit": labels[:1500]})
    sines = MultiTaskTensorDataset(x[:1000], {"sines": y[:1000]})
    loaders = {
        "digit": mk.data.loader(digits, 64, shuffle=True, generator=torch.Generator().manual_seed(0)),
        "sines": mk.data.loader(sines, 64, shuffle=True, generator=torch.Generator().manual_seed(1)),
    }
    train = mk.data.MultiInputLoader(loaders, schedule="uniform", steps_per_epoch=40, seed=0)
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    trainer = mk.Trainer(model, TASKS, "ew", optimizer, device="cpu", progress=False)
    trainer.fit(train, epochs=6)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[1500:])["digit"].argmax(1) == labels[1500:]).float().mean())
        mse = float((model(x[1000:])["sines"].squeeze(1) - y[1000:]).pow(2).mean())
    assert accuracy > 0.6  # 10 classes: chance is 0.1 (observed 0.68 after 120 digit steps)
    assert mse < float(y[1000:].var())  # better than predicting the mean
    stats = model.routing_statistics()
    assert {"moe/image/experts_used", "moe/vector/experts_used"} <= set(stats)
