"""M3ViT's routed mixture of experts: the sparse dispatch against the dense mixture, the balancing
loss, the smooth load estimate, task routing, single-task inference and static pruning, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mtlkit as mk
from mtlkit.models.moe import MoEMLP, NoisyTopKRouter, cv_squared

TASKS = mk.TaskSet([mk.Task("left", "ce"), mk.Task("right", "ce")])


def _model(**options) -> mk.models.M3ViT:
    torch.manual_seed(0)
    settings = {"dim": 32, "depth": 4, "heads": 4, "patch_size": 4, "num_experts": 8, "top_k": 2}
    return mk.models.M3ViT((1, 16, 16), TASKS, out_features=10, **{**settings, **options}).eval()


def test_with_every_expert_kept_the_layer_is_the_softmax_mixture_of_all_experts():
    torch.manual_seed(0)
    router, moe = NoisyTopKRouter(8, 5, top_k=5), MoEMLP(8, 6, 5)
    x = torch.randn(30, 8, dtype=torch.float64)
    router, moe = router.double(), moe.double()
    p = torch.softmax(x @ router.weight, dim=-1)
    expected = sum(p[:, e : e + 1] * moe.experts[e](x) for e in range(5))
    torch.testing.assert_close(moe(x, router(x)), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_the_sparse_dispatch_equals_the_dense_mixture_with_the_same_gates(router):
    model = _model(router=router).double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    tokens = model.tokens(x)
    for t in model.task_names:
        sparse, _ = model.encode(tokens, t)
        dense, _ = model.encode(tokens, t, dense=True)
        torch.testing.assert_close(sparse, dense, atol=1e-12, rtol=0)


def test_each_token_runs_exactly_its_k_experts():
    model = _model()
    moe = model.blocks[1].moe
    served = []
    hooks = [e.register_forward_hook(lambda m, i, o: served.append(i[0].shape[0])) for e in moe.experts]
    x = torch.randn(5, 1, 16, 16)
    model(x, task="left")
    for h in hooks:
        h.remove()
    tokens = 5 * (1 + 16)  # class token + 4 x 4 patches, per image
    assert sum(served) == tokens * model.top_k


def test_the_balancing_loss_is_zero_when_importance_and_load_are_uniform():
    router = NoisyTopKRouter(4, 4, top_k=4).train()
    with torch.no_grad():
        router.weight.zero_()  # every token: the four experts at 1/4 each
    assert float(router(torch.randn(10, 4)).loss.detach()) == pytest.approx(0.0, abs=1e-12)
    torch.manual_seed(0)
    skewed = NoisyTopKRouter(4, 4, top_k=1).train()
    assert float(skewed(torch.randn(50, 4)).loss.detach()) > 0.01
    assert float(cv_squared(torch.tensor([1.0, 1.0, 1.0]))) == 0.0


def test_the_smooth_load_is_differentiable_and_estimates_the_expected_counts():
    torch.manual_seed(0)
    router = NoisyTopKRouter(6, 8, top_k=2, noise_std=8.0).train()  # std 1 per logit
    x = torch.randn(40, 6)
    clean = x @ router.weight
    # per expert: the smooth estimate, averaged over noise draws, against Monte Carlo counts
    with torch.no_grad():
        smooth = torch.stack(
            [router._smooth_load(clean, clean + torch.randn_like(clean), 1.0) for _ in range(2000)]
        ).mean(0)
    draws = torch.stack([router(x).load for _ in range(3000)]).mean(0)
    assert float((smooth - draws).abs().max()) < 0.06 * float(draws.max())
    swapped = draws.flip(0)  # an estimate of the wrong experts would not pass
    assert float((smooth - swapped).abs().max()) > 0.06 * float(draws.max())
    router.zero_grad()
    router(x).loss.backward()
    assert router.weight.grad is not None and bool(router.weight.grad.abs().sum() > 0)


def test_tasks_route_differently_and_the_task_embedding_is_shared():
    model = _model(router="task_conditioned", num_experts=16, top_k=1)
    x = torch.randn(1, 1, 16, 16)  # 17 tokens, one expert each: a few of the 16 per block
    assert model.selected_experts(x, "left") != model.selected_experts(x, "right")
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.task_embedding.parameters())
    multi = _model()
    own = {id(p) for p in multi.task_parameters()["left"]}
    assert all(id(p) in own for p in multi.routers["left"].parameters())


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_pruning_the_unselected_experts_leaves_the_task_output_unchanged(router):
    model = _model(num_experts=16, top_k=1, router=router, noise_std=1.0).train()  # selection in eval
    x = torch.randn(1, 1, 16, 16)  # a small calibration set: 17 tokens select a few experts
    for t in model.task_names:
        pruned = model.prune(t, x)
        kept = [len(s) for s in model.selected_experts(x, t)]
        removed = sum(len(b.moe.pruned) for b in pruned.blocks if b.moe is not None)
        assert removed == sum(model.num_experts - k for k in kept) and removed > 0
        expected = model.eval()(x, task=t)[t]
        model.train()
        torch.testing.assert_close(pruned.eval()(x, task=t)[t], expected, atol=0, rtol=0)
        assert pruned.task_names == [t] and all(
            b.moe is None or b.moe.pruned_hits == 0 for b in pruned.blocks
        )
    other = torch.randn(6, 1, 16, 16) * 3  # new inputs may reach a removed expert: counted
    pruned = model.prune("left", x).eval()
    pruned(other, task="left")
    assert sum(b.moe.pruned_hits for b in pruned.blocks if b.moe is not None) > 0


def test_with_one_task_the_multi_gate_model_is_a_plain_noisy_top_k_moe_vit():
    # the reference written out token by token: pre-norm attention, then in the routed blocks
    # softmax(x W) over the experts, the k largest gates (not renormalised) times their experts
    one = mk.TaskSet([mk.Task("only", "ce")])
    torch.manual_seed(0)
    model = (
        mk.models.M3ViT(
            (1, 16, 16), one, out_features=10, dim=32, depth=4, heads=4, patch_size=4, num_experts=8, top_k=2
        )
        .double()
        .eval()
    )
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    h = model.tokens(x)
    routers = iter(model.routers["only"])
    for block in model.blocks:
        h = block.attend(h)
        z = block.norm2(h)
        if block.moe is None:
            h = h + block.mlp(z)
            continue
        weight = next(routers).weight
        mixed = torch.zeros_like(z)
        for b in range(z.shape[0]):
            for i in range(z.shape[1]):
                gates = torch.softmax(z[b, i] @ weight, dim=-1)
                top = gates.topk(2)
                for g, e in zip(top.values, top.indices, strict=True):
                    mixed[b, i] += g * block.moe.experts[int(e)](z[b, i])
        h = h + mixed
    expected = model.heads["only"](model.norm(h)[:, 0])
    torch.testing.assert_close(model(x)["only"], expected, atol=1e-10, rtol=0)


def test_the_routing_statistics_read_a_collapse_as_one_and_show_the_tasks_expert_overlap():
    model = _model(num_experts=8, top_k=2)
    model.last_load = {
        "left": torch.tensor([[10.0, 10, 0, 0, 0, 0, 0, 0]]),
        "right": torch.tensor([[0.0, 10, 10, 0, 0, 0, 0, 0]]),
    }
    stats = model.routing_statistics()
    assert stats["moe/left/max_load_share"] == 1.0  # every one of the 10 tokens reached expert 0
    assert stats["moe/left/experts_used"] == 0.25
    assert stats["moe/task_overlap"] == pytest.approx(1 / 3)  # {0, 1} and {1, 2}


def test_single_task_inference_costs_k_of_e_expert_flops():
    model = _model()
    x = torch.randn(4, 1, 16, 16)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    one = flops(lambda: model(x, task="left"))
    every = flops(lambda: model.encode(model.tokens(x), "left", dense=True))
    tokens, dim, hidden = 4 * 17, 32, 32
    per_expert = 2 * tokens * (2 * dim * hidden)  # two matmuls per expert over every token
    moe_blocks = len(model.moe_blocks)
    # the dense path runs all E experts; the sparse one k of them per token (plus the head)
    assert every - (one - 2 * 4 * 32 * 10) == moe_blocks * per_expert * (model.num_experts - model.top_k)
    assert flops(lambda: model(x)) > 1.9 * one  # all-task inference: one pass per task


def test_the_auxiliary_loss_reaches_the_routers_in_training_only():
    model = _model(noise_std=1.0).train()
    out = model(torch.randn(4, 1, 16, 16), full_output=True)
    assert set(out.aux_losses) == {"moe_balance/left", "moe_balance/right"}
    out.aux_losses["moe_balance/left"].backward()
    assert model.routers["left"][0].weight.grad is not None
    assert model.routers["right"][0].weight.grad is None
    assert model.eval()(torch.randn(4, 1, 16, 16), full_output=True).aux_losses is None
    stats = model.routing_statistics()
    assert 0 < stats["moe/left/experts_used"] <= 1 and stats["moe/left/max_load_share"] > 0
