"""Test-time-adaptation merging (AdaMerging, Concrete TA, Concrete AdaMerging): reductions to Task
Arithmetic, agreement with a scalar solver on the supervised control, the objectives doing what
they say, the shared Concrete mask, reproducibility and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

import mtlkit as mk
from mtlkit.merging.adaptive import entropy


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _family(tasks: int = 2, seed: int = 0) -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(seed)
    base = _net()
    experts = {}
    for t in range(tasks):
        expert = _net()
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.5 * torch.randn_like(p))
        experts[f"task{t}"] = expert
    return base, experts


def _data(names, batches: int = 1, labels: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        rows = []
        for _ in range(batches):
            x = torch.randn(32, 6, generator=g)
            rows.append((x, torch.randint(0, 3, (32,), generator=g)) if labels else x)
        out[name] = rows
    return out


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_without_steps_adamerging_is_task_arithmetic_at_its_initial_coefficient(granularity):
    base, experts = _family()
    merged = mk.merging.merge(
        base, experts, "adamerging", data=_data(experts), granularity=granularity, steps=0
    )
    ta = mk.merging.merge(base, experts, "task_arithmetic", scaling=0.3)
    for k in ta.state_dict:  # the coefficients are float32 0.3
        torch.testing.assert_close(merged.state_dict[k], ta.state_dict[k], atol=1e-6, rtol=0)
    count = len(merged.extras["coefficients"])
    assert count == 4 and all(len(c) == 2 for c in merged.extras["coefficients"].values())


def test_the_supervised_control_finds_the_scalar_solvers_coefficient():
    # one expert, one coefficient, one full batch: the fitted lambda minimises the cross-entropy
    base, experts = _family(tasks=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    with torch.no_grad():  # the expert's classes, a quarter of them redrawn: one interior optimum
        y = experts["task0"](x).argmax(1)
    y = torch.where(torch.rand(64, generator=g) < 0.25, torch.randint(0, 3, (64,), generator=g), y)
    data = {"task0": [(x, y)]}
    taus = {k: experts["task0"].state_dict()[k] - v for k, v in base.state_dict().items()}

    def loss(lam: float) -> float:
        model = _net()
        model.load_state_dict({k: v + lam * taus[k] for k, v in base.state_dict().items()})
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x), y))

    best = minimize_scalar(loss, bounds=(0, 3), method="bounded", options={"xatol": 1e-6}).x
    merged = mk.merging.merge(
        base, experts, "adamerging", data=data, granularity="task", objective="labels", lr=0.02, steps=800
    )
    (fitted,) = next(iter(merged.extras["coefficients"].values()))
    assert fitted == pytest.approx(best, abs=2e-3)


def test_entropy_minimisation_makes_the_merge_more_confident_and_expert_labels_make_it_imitate():
    base, experts = _family(seed=3)
    data = _data(experts, batches=2)

    def mean_entropy(state) -> float:
        model = _net()
        model.load_state_dict(state)
        with torch.no_grad():
            return sum(float(entropy(model(x))) for rows in data.values() for x in rows)

    def agreement(state) -> float:
        model = _net()
        model.load_state_dict(state)
        hits = []
        with torch.no_grad():
            for name, rows in data.items():
                for x in rows:
                    hits.append(float((model(x).argmax(1) == experts[name](x).argmax(1)).float().mean()))
        return sum(hits) / len(hits)

    start = mk.merging.merge(base, experts, "task_arithmetic", scaling=0.3).state_dict
    ada = mk.merging.merge(base, experts, "adamerging", data=data, steps=150, lr=1e-2)
    assert mean_entropy(ada.state_dict) < mean_entropy(start) - 0.1
    assert ada.extras["last_loss"][0] < ada.extras["first_loss"][0]
    imitated = mk.merging.merge(
        base, experts, "adamerging", data=data, objective="expert_labels", steps=150, lr=1e-2
    ).state_dict
    assert agreement(imitated) > agreement(start) + 0.05


def test_concrete_masks_are_mean_one_shared_and_reproducible():
    base, experts = _family()
    data = _data(experts)
    options = {"steps": 5, "lr": 1e-2}
    one = mk.merging.merge(base, experts, "concrete_ta", data=data, **options)
    two = mk.merging.merge(base, experts, "concrete_ta", data=data, **options)
    for k in one.state_dict:
        assert torch.equal(one.state_dict[k], two.state_dict[k])
    other = mk.merging.merge(base, experts, "concrete_ta", data=data, seed=1, **options)
    assert not torch.equal(one.state_dict["0.weight"], other.state_dict["0.weight"])
    # the mask's mean is 1 per tensor: a mask of one shared by the tasks, times the task-vector sum
    from mtlkit.merging.adaptive import TaskVectorModel
    from mtlkit.merging.concrete import ConcreteMask

    loads = [lambda n, e=e: e.state_dict()[n] for e in experts.values()]
    model = TaskVectorModel(base, list(base.state_dict()), lambda n: base.state_dict()[n], loads)
    mask = ConcreteMask(model, 0.0, 0.5, seed=0)
    for m in mask.sample().values():
        assert float(m.mean()) == pytest.approx(1.0, abs=1e-5) and bool((m >= 0).all())


@pytest.mark.parametrize("logits, expected", [(20.0, "ta"), (-20.0, "pretrained")])
def test_a_sure_discrete_mask_keeps_or_removes_every_task_vector(logits, expected):
    base, experts = _family()
    merged = mk.merging.merge(
        base,
        experts,
        "concrete_ta",
        data=_data(experts),
        steps=0,
        initial_logits=logits,
        eval_mask="discrete",
    ).state_dict
    reference = (
        mk.merging.merge(base, experts, "task_arithmetic", scaling=0.3).state_dict
        if expected == "ta"
        else base.state_dict()
    )
    for k in reference:
        torch.testing.assert_close(merged[k], reference[k].to(merged[k].dtype), atol=1e-6, rtol=0)


def test_concrete_adamerging_with_a_sure_mask_ends_as_adamerging():
    # one batch per task: both see the same batches; an all-ones mask leaves stage 2 plain AdaMerging
    base, experts = _family()
    data = _data(experts)
    concrete = mk.merging.merge(
        base, experts, "concrete_adamerging", data=data, steps=3, adamerging_steps=20,
        initial_logits=20.0, eval_mask="discrete",
    ).state_dict  # fmt: skip
    plain = mk.merging.merge(base, experts, "adamerging", data=data, steps=20).state_dict
    for k in plain:
        torch.testing.assert_close(concrete[k], plain[k], atol=1e-6, rtol=0)


def test_bad_input_is_named():
    base, experts = _family()
    with pytest.raises(mk.errors.ConfigError, match="needs data"):
        mk.merging.merge(base, experts, "adamerging")
    with pytest.raises(mk.errors.ConfigError, match="labels"):
        mk.merging.merge(base, experts, "adamerging", data=_data(experts), objective="labels", steps=1)
    with pytest.raises(mk.errors.UnknownNameError):
        mk.merging.merge(base, experts, "adamerging", data=_data(experts), objective="accuracy")
    with pytest.raises(mk.errors.ConfigError, match="No test-time batches"):
        mk.merging.merge(base, experts, "adamerging", data={n: [] for n in experts})

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return {"other": self.net(x)}

    keyed = {n: Keyed() for n in experts}
    with pytest.raises(mk.errors.ShapeMismatchError, match="no logits for task"):
        mk.merging.merge(
            Keyed(), keyed, "adamerging", data=_data(experts), objective="expert_labels", steps=1
        )
    with pytest.raises(mk.errors.ConfigError, match="temperature"):
        mk.merging.merge(base, experts, "concrete_ta", data=_data(experts), temperature=0.0)


@pytest.mark.parametrize("method", ["adamerging", "concrete_adamerging"])
def test_batch_norm_statistics_are_merged_without_a_gradient(method):
    torch.manual_seed(0)

    def net() -> nn.Sequential:
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    base = net()
    with torch.no_grad():  # statistics of their own, so their task vectors are not 0
        base[1].running_mean.normal_()
        base[1].running_var.uniform_(0.5, 2.0)
    experts = {}
    for t in range(2):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for tensor in [*expert.parameters(), expert[1].running_mean, expert[1].running_var]:
                tensor.add_(0.3 * torch.randn_like(tensor))
        experts[f"task{t}"] = expert
    options = (
        {"steps": 5, "lr": 0.05}
        if method == "adamerging"
        else {"steps": 3, "adamerging_steps": 5, "adamerging_lr": 0.05}
    )
    result = mk.merging.merge(base, experts, method, data=_data(experts), **options)
    coefficients = result.extras["coefficients"]
    assert coefficients["1.running_mean"] == pytest.approx([0.3, 0.3])  # no gradient: the start
    assert coefficients["0.weight"] != pytest.approx([0.3, 0.3])  # parameters moved
