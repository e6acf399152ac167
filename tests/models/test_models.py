import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ShapeMismatchError, UnknownNameError

TASKS = mk.TaskSet([mk.Task("a"), mk.Task("b", loss="ce")])


def test_mmoe_with_one_expert_equals_shared_bottom_exactly():
    mmoe = mk.models.MMoE(6, TASKS, num_experts=1, expert_dims=[8, 5], tower_dims=[4], out_features={"b": 3})
    sb = mk.models.SharedBottom(6, TASKS, bottom_dims=[8, 5], tower_dims=[4], out_features={"b": 3})
    sb.bottom.load_state_dict(mmoe.experts[0].state_dict())
    sb.towers.load_state_dict(mmoe.towers.state_dict())
    x = torch.randn(16, 6)
    a, b = mmoe(x), sb(x)
    for t in TASKS.names:
        assert torch.equal(a[t], b[t])


def test_mmoe_with_zero_gate_weights_averages_experts():
    mmoe = mk.models.MMoE(6, TASKS, num_experts=4, expert_dims=[5], tower_dims=[])
    for g in mmoe.gates.values():
        torch.nn.init.zeros_(g.weight)
        torch.nn.init.zeros_(g.bias)
    x = torch.randn(3, 6)
    out = mmoe(x)
    mean = torch.stack([e(x) for e in mmoe.experts], 1).mean(1)
    torch.testing.assert_close(out["a"], mmoe.towers["a"](mean), atol=1e-6, rtol=0)
    assert torch.allclose(mmoe.last_gates["b"], torch.full((3, 4), 0.25))


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe"])
def test_protocol_shapes_and_task_isolation(name):
    model = mk.models.create(name, in_features=6, tasks=TASKS, out_features={"b": 3})
    assert isinstance(model, mk.models.MultiTaskModel)
    per_task = model.task_parameters()
    out = model(torch.randn(2, 6))
    assert out["a"].shape == (2, 1) and out["b"].shape == (2, 3)
    only = model(torch.randn(2, 6), task="b")
    # task b's loss has no gradient on task a's parameters
    only["b"].sum().backward()
    assert all(p.grad is None for p in per_task["a"])


def test_model_errors():
    model = mk.models.SharedBottom(6, TASKS)
    with pytest.raises(ShapeMismatchError, match=r"\(batch, 6\)"):
        model(torch.randn(2, 5))
    with pytest.raises(UnknownNameError, match="Did you mean 'a'"):
        model(torch.randn(2, 6), task="aa")
    with pytest.raises(UnknownNameError, match="Did you mean 'mmoe'"):
        mk.models.create("mmeo", in_features=6, tasks=TASKS)
