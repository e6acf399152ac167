"""Cross-stitch and MTAN on the small convolutional encoder (spec tests A8, A9)."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError, ShapeMismatchError

TASKS = mk.TaskSet([mk.Task("a"), mk.Task("b", loss="ce"), mk.Task("c")])


def zero(gs):
    return all(g is None or not g.any() for g in gs)


def test_cross_stitch_init_rows_sum_to_one():
    model = mk.models.CrossStitch(1, TASKS, channels=(4, 8, 8), out_features={"b": 10})
    for alpha in model.alphas:
        torch.testing.assert_close(alpha.sum(1), torch.ones(3))
        torch.testing.assert_close(alpha.diagonal(), torch.full((3,), 0.9))
    per_channel = mk.models.CrossStitch(1, TASKS, channels=(4, 8, 8), per_channel=True)
    assert [tuple(a.shape) for a in per_channel.alphas] == [(3, 3, 4), (3, 3, 8)]
    single = mk.models.CrossStitch(1, ["a"], channels=(4, 8))
    assert torch.equal(single.alphas[0], torch.ones(1, 1))


@pytest.mark.parametrize("per_channel", [False, True])
def test_cross_stitch_with_identity_mixing_has_no_cross_task_gradient(per_channel):
    torch.manual_seed(0)
    model = mk.models.CrossStitch(
        1, TASKS, channels=(4, 8, 8), per_channel=per_channel, out_features={"b": 10}
    )
    with torch.no_grad():
        for alpha in model.alphas:
            eye = torch.eye(3) if alpha.dim() == 2 else torch.eye(3)[:, :, None].expand_as(alpha)
            alpha.copy_(eye)
    out = model(torch.randn(4, 1, 12, 12))
    for t in TASKS.names:
        for u in TASKS.names:
            g = torch.autograd.grad(
                out[t].sum(), list(model.column(u).parameters()), retain_graph=True, allow_unused=True
            )
            assert zero(g) == (u != t)
    # with the initial mixing every column reaches every task
    fresh = mk.models.CrossStitch(1, TASKS, channels=(4, 8, 8), out_features={"b": 10})
    out = fresh(torch.randn(4, 1, 12, 12))
    g = torch.autograd.grad(out["a"].sum(), list(fresh.column("c").parameters())[:2], allow_unused=True)
    assert not zero(g)


def test_cross_stitch_mixes_columns_by_alpha():
    torch.manual_seed(0)
    model = mk.models.CrossStitch(1, ["a", "b"], channels=(4, 8)).eval()
    x = torch.randn(2, 1, 8, 8)
    full = model(x, full_output=True)
    h = [model.column(t)[0](x) for t in ("a", "b")]
    alpha = model.alphas[0]
    want_a = alpha[0, 0] * h[0] + alpha[0, 1] * h[1]
    torch.testing.assert_close(full.representation["a"], want_a)


def test_mtan_with_masks_forced_to_one_reproduces_the_shared_features():
    torch.manual_seed(0)
    model = mk.models.MTAN(1, TASKS, channels=(4, 8, 8), out_features={"b": 10})
    with torch.no_grad():  # sigmoid of a huge bias: every mask is exactly 1
        for modules in model.attention.values():
            for att in modules:
                att[4].bias.fill_(1e4)
    x = torch.randn(3, 1, 16, 16)
    full = model(x, full_output=True)
    # the shared features through the attention-side blocks, without any mask
    h, f = x, None
    for j, stage in enumerate(model.encoder):
        _p, q = stage(h)
        h = model.pool(q)
        f = model.pool(model.attention_blocks[j](q))
    for t in TASKS.names:
        assert all(bool((m == 1).all()) for m in model.last_masks[t])
        torch.testing.assert_close(full.representation[t], f, atol=1e-6, rtol=0)


def test_mtan_task_loss_reaches_only_its_attention_and_the_shared_encoder():
    torch.manual_seed(0)
    model = mk.models.MTAN(1, TASKS, channels=(4, 8), out_features={"b": 10})
    out = model(torch.randn(3, 1, 8, 8))
    for t in TASKS.names:
        for u in TASKS.names:
            g = torch.autograd.grad(
                out[t].sum(), list(model.attention[u].parameters()), retain_graph=True, allow_unused=True
            )
            assert zero(g) == (u != t)
        g = torch.autograd.grad(
            out[t].sum(), list(model.encoder.parameters()), retain_graph=True, allow_unused=True
        )
        assert not zero(g)
    stats = model.routing_statistics()
    assert set(stats) == {f"mask/{t}/stage{j}" for t in TASKS.names for j in (1, 2)}


def test_image_models_check_their_inputs():
    model = mk.models.MTAN((1, 8, 8), TASKS, channels=(4,))
    with pytest.raises(ShapeMismatchError, match=r"\(batch, 1, 8, 8\)"):
        model(torch.randn(2, 1, 9, 9))
    with pytest.raises(ShapeMismatchError, match="images"):
        mk.models.CrossStitch(1, TASKS, channels=(4, 8))(torch.randn(2, 64))
    with pytest.raises(ConfigError, match="at least 2"):
        mk.models.CrossStitch(1, TASKS, channels=(4,))
    with pytest.raises(ConfigError, match="alpha_self"):
        mk.models.CrossStitch(1, TASKS, alpha_self=1.5)
    with pytest.raises(ConfigError, match=r"C or \(C, H, W\)"):
        mk.models.MTAN((8, 8), TASKS)


def test_cross_stitch_single_task_forward_returns_that_tasks_representation():
    model = mk.models.CrossStitch(1, TASKS, channels=(4, 8), out_features={"b": 10})
    full = model(torch.randn(2, 1, 8, 8), task="c", full_output=True)
    assert list(full.predictions) == ["c"] and list(full.representation) == ["c"]


def test_multi_lenet_has_the_papers_layer_sizes():
    # 28x28 -> conv9 20 -> pool 10 -> conv5 6 -> pool 3: 20*3*3 = 180 features; 36x36 inputs give 500
    tasks = mk.TaskSet([mk.Task("left", loss="ce"), mk.Task("right", loss="ce")])
    small = mk.models.create("lenet", in_features=(1, 28, 28), tasks=tasks)
    large = mk.models.create("lenet", in_features=(1, 36, 36), tasks=tasks)
    assert small.shared[1].in_features == 180 and large.shared[1].in_features == 500
    out = small(torch.randn(3, 1, 28, 28), full_output=True)
    assert out.representation.shape == (3, 50) and out.predictions["left"].shape == (3, 10)
    with pytest.raises(mk.errors.ShapeMismatchError):
        small(torch.randn(3, 1, 36, 36))
