import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlkit as mk
from mtlkit.errors import (
    DTypeMismatchError,
    MissingTaskError,
    ShapeMismatchError,
    TaskError,
    UnknownNameError,
)


def test_losses_match_torch_functionals():
    tasks = mk.TaskSet(
        [
            mk.Task("reg", loss="mse"),
            mk.Task("abs", loss="l1"),
            mk.Task("hub", loss="huber"),
            mk.Task("bin", loss="bce"),
            mk.Task("cls", loss="ce"),
        ]
    )
    p = torch.randn(8, 1)
    logits = torch.randn(8, 4)
    y = torch.randn(8)
    b = torch.randint(0, 2, (8,)).float()
    c = torch.randint(0, 4, (8,))
    out = {"reg": p, "abs": p, "hub": p, "bin": p, "cls": logits}
    tgt = {"reg": y, "abs": y, "hub": y, "bin": b, "cls": c}
    losses = tasks.losses(out, tgt)
    assert torch.allclose(losses["reg"], F.mse_loss(p.squeeze(1), y))
    assert torch.allclose(losses["abs"], F.l1_loss(p.squeeze(1), y))
    assert torch.allclose(losses["hub"], F.huber_loss(p.squeeze(1), y))
    assert torch.allclose(losses["bin"], F.binary_cross_entropy_with_logits(p.squeeze(1), b))
    assert torch.allclose(losses["cls"], F.cross_entropy(logits, c))
    assert losses.labelled.tolist() == [8] * 5


def test_nan_targets_are_masked_out_of_loss_and_gradient():
    task = mk.TaskSet([mk.Task("r", loss="mse")])
    pred = torch.randn(6, requires_grad=True)
    y = torch.randn(6)
    y[[1, 4]] = float("nan")
    loss = task.losses({"r": pred}, {"r": y})["r"]
    keep = torch.tensor([0, 2, 3, 5])
    assert torch.allclose(loss, F.mse_loss(pred[keep], y[keep]))
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[1] == 0 and pred.grad[4] == 0


def test_explicit_mask_and_negative_class_index():
    tasks = mk.TaskSet([mk.Task("b", loss="bce"), mk.Task("c", loss="ce")])
    pb = torch.randn(5, requires_grad=True)
    pc = torch.randn(5, 3, requires_grad=True)
    yb = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    yc = torch.tensor([0, -100, 2, 1, -1])
    mask = {"b": torch.tensor([True, False, True, False, True])}
    losses = tasks.losses({"b": pb, "c": pc}, {"b": yb, "c": yc}, masks=mask)
    kb = torch.tensor([0, 2, 4])
    kc = torch.tensor([0, 2, 3])
    assert torch.allclose(losses["b"], F.binary_cross_entropy_with_logits(pb[kb], yb[kb]))
    assert torch.allclose(losses["c"], F.cross_entropy(pc[kc], yc[kc]))
    assert losses.labelled.tolist() == [3, 3]


def test_task_without_labels_gives_zero_loss_and_zero_gradient():
    tasks = mk.TaskSet([mk.Task("r", loss="mse"), mk.Task("c", loss="ce")])
    pr = torch.randn(4, requires_grad=True)
    pc = torch.randn(4, 3, requires_grad=True)
    losses = tasks.losses({"r": pr, "c": pc}, {"r": torch.full((4,), math.nan), "c": torch.full((4,), -1)})
    assert losses["r"].item() == 0.0 and losses["c"].item() == 0.0
    (losses["r"] + losses["c"]).backward()
    assert torch.count_nonzero(pr.grad) == 0 and torch.count_nonzero(pc.grad) == 0
    assert losses.labelled.tolist() == [0, 0]


def test_custom_callable_sees_only_labelled_rows():
    seen = {}

    def loss(p, t):
        seen["n"] = p.shape[0]
        return ((p - t) ** 4).mean()

    tasks = mk.TaskSet([mk.Task("q", loss=loss)])
    y = torch.tensor([1.0, math.nan, 3.0])
    p = torch.zeros(3)
    value = tasks.losses({"q": p}, {"q": y})["q"]
    assert seen["n"] == 2 and torch.isclose(value, torch.tensor((1 + 81) / 2))


def test_shape_and_dtype_errors_name_the_task():
    tasks = mk.TaskSet([mk.Task("income", loss="bce"), mk.Task("kind", loss="ce")])
    with pytest.raises(ShapeMismatchError, match="income"):
        tasks.losses(
            {"income": torch.randn(4, 2), "kind": torch.randn(4, 3)},
            {"income": torch.ones(4), "kind": torch.zeros(4).long()},
        )
    with pytest.raises(DTypeMismatchError, match="kind.*integer class indices"):
        tasks.losses(
            {"income": torch.randn(4), "kind": torch.randn(4, 3)},
            {"income": torch.ones(4), "kind": torch.zeros(4)},
        )
    with pytest.raises(ShapeMismatchError, match="batch dimension"):
        tasks.losses(
            {"income": torch.randn(3), "kind": torch.randn(4, 3)},
            {"income": torch.ones(4), "kind": torch.zeros(4).long()},
        )
    with pytest.raises(MissingTaskError, match="kind"):
        tasks.losses({"income": torch.randn(4)}, {"income": torch.ones(4)})


def test_bad_task_sets():
    with pytest.raises(TaskError, match="at least one"):
        mk.TaskSet([])
    with pytest.raises(TaskError, match="Duplicate.*'a'"):
        mk.TaskSet([mk.Task("a"), mk.Task("a")])
    with pytest.raises(UnknownNameError, match="Did you mean 'mse'"):
        mk.Task("a", loss="mes")
    with pytest.raises(UnknownNameError, match="Did you mean 'income'"):
        mk.TaskSet([mk.Task("income")])["incme"]


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.one_of(st.floats(-5, 5), st.just(math.nan)), min_size=1, max_size=12),
    loss=st.sampled_from(["mse", "l1", "huber"]),
)
def test_masked_loss_is_the_mean_over_labelled_entries(values, loss):
    target = torch.tensor(values, dtype=torch.float64)
    pred = torch.linspace(-1, 1, len(values), dtype=torch.float64, requires_grad=True)
    value = mk.TaskSet([mk.Task("t", loss=loss)]).losses({"t": pred}, {"t": target})["t"]
    keep = ~torch.isnan(target)
    fn = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[loss]
    expected = fn(pred[keep], target[keep]) if keep.any() else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[~keep] == 0).all()


def test_custom_loss_never_sees_a_nan_target():
    seen = {}

    def loss(p, t):
        seen["nan"] = bool(torch.isnan(t).any())
        return ((p - t) ** 2).mean()

    target = torch.tensor([[1.0, math.nan], [2.0, 3.0], [math.nan, math.nan]])
    value = mk.TaskSet([mk.Task("v", loss=loss)]).losses({"v": torch.zeros(3, 2)}, {"v": target})["v"]
    assert seen["nan"] is False and value.item() == pytest.approx((4 + 9) / 2)


def test_low_precision_predictions_do_not_round_targets():
    target = torch.tensor([1234.5, 300.7])
    pred = torch.tensor([1234.0, 300.0], dtype=torch.bfloat16)
    value = mk.TaskSet([mk.Task("r", loss="l1")]).losses({"r": pred}, {"r": target})["r"]
    assert value.dtype == torch.float32
    expected = (
        (pred.float() - target).abs().mean()
    )  # bfloat16 stores 1234.0 as 1232.0; the target stays exact
    assert value.item() == pytest.approx(expected.item(), abs=1e-4)


def test_every_error_is_a_value_or_runtime_error():
    from mtlkit import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.MtlkitError)]
    for cls in classes:
        if cls is not errors.MtlkitError:
            assert issubclass(cls, (ValueError, RuntimeError)), cls


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.one_of(st.floats(-5, 5), st.just(math.nan)), min_size=2, max_size=12),
    loss=st.sampled_from(["mse", "l1", "huber", "bce", "ce"]),
    width=st.sampled_from([1, 3]),
)
def test_per_sample_losses_sum_to_the_task_loss(values, loss, width):
    """sums.sum() / counts.sum() is the task's loss, for scalar and multi-entry targets."""
    n = len(values)
    raw = torch.tensor(values, dtype=torch.float64)
    if loss == "ce":
        target = torch.where(torch.isnan(raw), -1, raw.abs().round().long() % 3)
        pred = torch.linspace(-1, 1, n * 3, dtype=torch.float64).view(n, 3)
    else:
        target = torch.sigmoid(raw) if loss == "bce" else raw
        target = target[:, None].repeat(1, width) if width > 1 else target
        pred = torch.linspace(-1, 1, target.numel(), dtype=torch.float64).view(target.shape)
    task = mk.Task("t", loss=loss)
    sums, counts = task.sample_losses(pred, target)
    value, count = task.loss_value(pred, target)
    assert sums.shape == counts.shape == (n,) and int(counts.sum()) == int(count)
    torch.testing.assert_close(sums.sum() / counts.sum().clamp(min=1), value)


def test_per_sample_losses_of_a_callable_need_one_value_per_sample():
    per_sample = mk.Task("p", loss=lambda p, t: (p - t) ** 2)
    target = torch.tensor([1.0, math.nan, 3.0])
    sums, counts = per_sample.sample_losses(torch.zeros(3), target)
    assert sums.tolist() == [1.0, 0.0, 9.0] and counts.tolist() == [1, 0, 1]
    with pytest.raises(TaskError, match="one value per"):
        mk.Task("s", loss=lambda p, t: ((p - t) ** 2).mean()).sample_losses(torch.zeros(3), target)
