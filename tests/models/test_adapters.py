"""Poly and MHR routed LoRA adapters: the spec's identities (one head is Poly, one-hot routing is one
LoRA, uniform routing is the averaged LoRA, zero B is the base model), the head-block structure
against an explicit loop, parameter vs output mixing, MHR-z and MHR-mu, few-shot tasks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlkit as mk
from mtlkit.models.adapters import RoutedLoRALinear, add_routed_adapters, set_task


def _layer(heads: int = 1, mixing: str = "parameters", skills: int = 4, rank: int = 2) -> RoutedLoRALinear:
    torch.manual_seed(0)
    layer = RoutedLoRALinear(
        nn.Linear(8, 6), ["a", "b"], skills=skills, rank=rank, heads=heads, mixing=mixing
    )
    layer = layer.double()
    with torch.no_grad():  # a trained-looking inventory and routing (B starts at zero)
        layer.lora_b.normal_()
        for z in layer.routing.values():
            z.normal_()
    layer.task = "a"
    return layer


def _set_one_hot(layer: RoutedLoRALinear, skill: int) -> None:
    with torch.no_grad():
        z = torch.full_like(layer.routing["a"], -1e4)  # sigmoid(-1e4) is exactly 0
        z[:, skill] = 1e4
        layer.routing["a"].copy_(z)


def _lora(layer: RoutedLoRALinear, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return layer.base(x) + layer.scaling * (x @ a) @ b


def test_one_head_is_poly_the_weighted_sums_of_a_and_b():
    layer, x = _layer(heads=1), torch.randn(5, 8, dtype=torch.float64)
    w = torch.sigmoid(layer.routing["a"][0])
    w = w / w.sum()
    a = torch.einsum("s,sir->ir", w, layer.lora_a)
    b = torch.einsum("s,sro->ro", w, layer.lora_b)
    torch.testing.assert_close(layer(x), _lora(layer, a, b, x), atol=1e-10, rtol=0)


def test_mhr_mixes_each_heads_block_of_rows_and_columns():
    layer, x = _layer(heads=2), torch.randn(5, 8, dtype=torch.float64)
    w = layer.weights("a")
    a = torch.cat([sum(w[q, s] * layer.lora_a[s, 4 * q : 4 * q + 4] for s in range(4)) for q in range(2)])
    b = torch.cat(
        [sum(w[q, s] * layer.lora_b[s][:, 3 * q : 3 * q + 3] for s in range(4)) for q in range(2)], dim=1
    )
    torch.testing.assert_close(layer(x), _lora(layer, a, b, x), atol=1e-10, rtol=0)
    assert not torch.allclose(layer(x), _layer(heads=1)(x))  # the heads change the adapter


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("mixing", ["parameters", "outputs"])
def test_one_hot_routing_is_that_skills_lora(heads, mixing):
    layer, x = _layer(heads=heads, mixing=mixing), torch.randn(5, 8, dtype=torch.float64)
    _set_one_hot(layer, 2)
    torch.testing.assert_close(
        layer(x), _lora(layer, layer.lora_a[2], layer.lora_b[2], x), atol=1e-10, rtol=0
    )


def test_parameter_mixing_is_not_output_mixing():
    x = torch.randn(5, 8, dtype=torch.float64)
    params, outputs = _layer(mixing="parameters"), _layer(mixing="outputs")
    w = params.weights("a")[0]
    expected = params.base(x) + params.scaling * sum(
        w[s] * (x @ params.lora_a[s]) @ params.lora_b[s] for s in range(4)
    )
    torch.testing.assert_close(outputs(x), expected, atol=1e-10, rtol=0)
    assert (params(x) - outputs(x)).abs().max() > 1e-3  # (sum w A)(sum w B) != sum w A B


def test_uniform_routing_is_the_averaged_lora_and_mhr_mu_freezes_the_router():
    layer, x = _layer(heads=2), torch.randn(5, 8, dtype=torch.float64)
    layer.average_routing()
    torch.testing.assert_close(
        layer(x), _lora(layer, layer.lora_a.mean(0), layer.lora_b.mean(0), x), atol=1e-10, rtol=0
    )
    assert not any(p.requires_grad for p in layer.routing.parameters())


def test_zero_initialised_b_leaves_the_base_model_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = RoutedLoRALinear(base, ["a"], skills=4, heads=2)
    layer.task = "a"
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)
    assert not any(p.requires_grad for p in base.parameters())


def test_mhr_z_fine_tunes_only_the_routing_of_a_new_task():
    torch.manual_seed(0)
    tasks = mk.TaskSet([mk.Task("a"), mk.Task("b")])
    model = mk.models.RoutedAdapters(6, tasks, hidden_dims=[16, 16], skills=4, heads=2)
    x, y = torch.randn(32, 6), {"a": torch.randn(32), "b": torch.randn(32)}
    mk.Trainer(
        model, tasks, "ew", torch.optim.Adam(model.parameters(), lr=1e-2), device="cpu", progress=False
    ).fit([(x, y)] * 5, epochs=1)
    model.add_task("c")
    model.train_routing_only()
    # what MHR-z itself freezes: every skill, and nothing of the routing or the heads
    assert not any(p.requires_grad for layer in model.adapted for p in (layer.lora_a, layer.lora_b))
    assert all(p.requires_grad for layer in model.adapted for p in layer.routing.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    for p in model.heads.parameters():
        p.requires_grad_(False)
    skills = [p.detach().clone() for layer in model.adapted for p in (layer.lora_a, layer.lora_b)]
    others = [layer.routing[t].detach().clone() for layer in model.adapted for t in ("a", "b")]
    new = [layer.routing["c"].detach().clone() for layer in model.adapted]
    few = mk.TaskSet([mk.Task("c")])
    assert not any(p.requires_grad for layer in model.adapted for p in (layer.lora_a, layer.lora_b))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        few.losses(model(x, task="c"), {"c": torch.randn(32)})["c"].backward()
        optimizer.step()
    after = [p for layer in model.adapted for p in (layer.lora_a, layer.lora_b)]
    assert all(torch.equal(a, b) for a, b in zip(skills, after, strict=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            others, [layer.routing[t] for layer in model.adapted for t in ("a", "b")], strict=True
        )
    )
    assert all(not torch.equal(a, layer.routing["c"]) for a, layer in zip(new, model.adapted, strict=True))


def test_the_optimizer_groups_give_the_routing_its_own_rate_and_skip_frozen_parameters():
    tasks = mk.TaskSet([mk.Task("a"), mk.Task("b")])
    model = mk.models.RoutedAdapters(6, tasks, hidden_dims=[16, 16], skills=4, heads=2)
    routing, rest = model.optimizer_groups(lr=1e-3)
    assert (routing["lr"], rest["lr"]) == (0.1, 1e-3)
    logits = {id(p) for layer in model.adapted for p in layer.routing.parameters()}
    assert {id(p) for p in routing["params"]} == logits
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in rest["params"]} == trainable - logits  # skills and heads, no frozen base
    trainer = mk.Trainer(model, tasks, "ew", device="cpu", progress=False)  # the default optimiser
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.1, 1e-3]
    model.average_routing()  # MHR-mu: no routing group left
    assert [g["lr"] for g in model.optimizer_groups()] == [1e-3]


def test_at_the_official_routing_rate_the_routing_leaves_uniform_and_at_the_skills_rate_it_does_not():
    # the logits start within 1e-3 of zero; the tasks need different skills, so trained routing
    # concentrates, but only when the logits get mttl's 0.1 rather than the skills' 1e-3
    def trained_max_weight(routing_lr: float) -> float:
        torch.manual_seed(0)
        tasks = mk.TaskSet([mk.Task("a"), mk.Task("b")])
        model = mk.models.RoutedAdapters(6, tasks, hidden_dims=[16, 16], skills=4, heads=1)
        x = torch.randn(256, 6)
        y = {"a": torch.sin(2 * x[:, 0]), "b": torch.cos(2 * x[:, 1])}
        optimizer = torch.optim.Adam(model.optimizer_groups(lr=1e-3, routing_lr=routing_lr))
        mk.Trainer(model, tasks, "ew", optimizer, device="cpu", progress=False).fit([(x, y)] * 100, epochs=1)
        stats = model.routing_statistics()
        return max(stats["routing/a/max_weight"], stats["routing/b/max_weight"])

    official, slow = trained_max_weight(0.1), trained_max_weight(1e-3)
    assert official > 0.9  # observed 0.998: nearly one skill; 1/S = 0.25 is uniform
    assert slow < 0.3  # observed 0.270


def test_a_torch_attention_backbone_gets_adapters_everywhere_but_the_attention_output():
    from mtlkit.models.m3vit import TransformerBlock  # torch attention and our own MLP

    torch.manual_seed(0)
    block = TransformerBlock(16, 4, 32, None, 0.0).eval()
    x = torch.randn(3, 5, 16)
    before = block(x)[0]
    adapted = add_routed_adapters(block, ["a"], skills=2)
    assert len(adapted) == 2  # the MLP's two maps; out_proj is read as a weight by the attention
    set_task(adapted, "a")
    torch.testing.assert_close(block(x)[0], before, atol=0, rtol=0)  # B = 0: unchanged
    with pytest.raises(mk.errors.ConfigError, match="reads its weight directly"):
        add_routed_adapters(TransformerBlock(16, 4, 32, None, 0.0), ["a"], select=lambda n, m: True)
    with pytest.raises(mk.errors.ConfigError, match="no nn.Linear"):  # torch's layer: all fused
        add_routed_adapters(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), ["a"])


def test_serving_only_a_new_task_trains_it_alone():
    torch.manual_seed(0)
    tasks = mk.TaskSet([mk.Task("a"), mk.Task("b")])
    model = mk.models.RoutedAdapters(6, tasks, hidden_dims=[16, 16], skills=4, heads=2)
    model.add_task("c")
    model.serve_only(["c"])
    x = torch.randn(32, 6)
    assert list(model(x)) == ["c"]
    others = ("routing.a", "routing.b", "heads.a.", "heads.b.")
    before = {k: v.clone() for k, v in model.state_dict().items() if any(o in k for o in others)}
    assert len(before) == 2 * len(model.adapted) + 4
    few = mk.TaskSet([mk.Task("c")])
    mk.Trainer(model, few, "ew", device="cpu", progress=False).fit(
        [(x, {"c": torch.randn(32)})] * 3, epochs=1
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert any(
        not torch.equal(p, torch.zeros_like(p)) for layer in model.adapted for p in [layer.routing["c"]]
    )
    with pytest.raises(mk.errors.ConfigError, match="serve_only"):
        model.serve_only(["z"])


def test_bad_configurations_are_refused():
    with pytest.raises(mk.errors.ConfigError, match="heads dividing"):
        RoutedLoRALinear(nn.Linear(8, 6), ["a"], heads=4)
    with pytest.raises(mk.errors.UnknownNameError):
        RoutedLoRALinear(nn.Linear(8, 6), ["a"], mixing="products")
    layer = RoutedLoRALinear(nn.Linear(8, 6), ["a"])
    with pytest.raises(mk.errors.ConfigError, match="no task is set"):
        layer(torch.randn(2, 8))
