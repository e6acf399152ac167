"""The model contract, checked for every registered model and for models whose shared/task split
is not a tree (a new model is enrolled by registering it)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mtlkit as mk
from mtlkit.core.contract import MultiTaskOutput, check_parameter_split, forward_full
from mtlkit.errors import ModelContractError
from tests.models.toy_models import CrossTaskHead, PerTaskRepresentation

TASKS = mk.TaskSet([mk.Task("a"), mk.Task("b", loss="ce")])
FUNNEL = mk.TaskSet([mk.Task("click", loss="bce"), mk.Task("buy", loss="bce")])


def registered(name):
    if mk.models.MODELS.get(name).funnel:
        return mk.models.create(name, in_features=6, tasks=FUNNEL)
    return mk.models.create(name, in_features=6, tasks=TASKS, out_features={"b": 3})


MODELS = [pytest.param(lambda n=n: registered(n), id=n) for n in mk.models.available()]
MODELS += [
    pytest.param(CrossTaskHead, id="cross_task_head"),
    pytest.param(PerTaskRepresentation, id="per_task_rep"),
]


def inputs(model):
    if hasattr(model, "example_input") and getattr(model, "in_features", None) is not None:
        return model.example_input(4)
    return torch.randn(4, 5)


@pytest.mark.parametrize("factory", MODELS)
def test_outputs_full_output_and_single_task_forward(factory):
    model = factory()
    x = inputs(model)
    torch.manual_seed(0)  # the same dropout masks for both calls
    out = model(x)
    assert isinstance(out, dict) and list(out) == model.task_names
    torch.manual_seed(0)
    full = model(x, full_output=True)
    assert isinstance(full, MultiTaskOutput)
    for t in model.task_names:
        torch.testing.assert_close(full.predictions[t], out[t])
    rep = full.representation
    reps = rep.values() if isinstance(rep, dict) else [rep]
    assert all(r.requires_grad and r.grad_fn is not None for r in reps)
    if isinstance(rep, dict):
        assert list(rep) == model.task_names
    only = model(x, task=model.task_names[-1])
    assert list(only) == [model.task_names[-1]]


@pytest.mark.parametrize("factory", MODELS)
def test_every_trainable_parameter_is_shared_or_task_specific(factory):
    model = factory()
    check_parameter_split(model)
    shared = {id(p) for p in model.shared_parameters()}
    specific = {id(p) for ps in model.task_parameters().values() for p in ps}
    assert shared.isdisjoint(specific)
    assert shared | specific == {id(p) for p in model.parameters() if p.requires_grad}  # frozen: neither


@pytest.mark.parametrize("factory", MODELS)
def test_the_representation_separates_the_shared_part(factory):
    # the losses reach the shared parameters only through the representation: one backward of the
    # representation's cotangent reproduces the summed loss's gradient on them exactly
    model = factory().double()
    x = inputs(model).double()
    full = model(x, full_output=True)
    total = sum(v.double().pow(2).sum() for v in full.predictions.values())
    rep = full.representation
    reps = list(rep.values()) if isinstance(rep, dict) else [rep]
    shared = model.shared_parameters()
    if not shared:  # soft parameter sharing: nothing is shared, nothing to separate
        assert mk.models.MODELS.get("soft_sharing") is type(model)
        return
    # a sparse mixture of experts leaves the experts no token chose out of the graph: zeros both ways
    ref = torch.autograd.grad(total, shared, retain_graph=True, allow_unused=True, materialize_grads=True)
    cot = torch.autograd.grad(total, reps, retain_graph=True)
    via = torch.autograd.grad(reps, shared, grad_outputs=cot, allow_unused=True, materialize_grads=True)
    assert any(bool(a.abs().sum()) for a in ref)
    for a, b in zip(ref, via, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["mgda", "mgda_ub", "upgrad", "ew", "famo"])
@pytest.mark.parametrize("model_cls", [CrossTaskHead, PerTaskRepresentation])
def test_models_that_are_not_trees_train_with_methods_at_both_levels(model_cls, name):
    torch.manual_seed(0)
    model = model_cls()
    tasks = mk.TaskSet([mk.Task(t) for t in model.task_names])
    x = torch.randn(32, 5)
    y = {t: torch.randn(32) for t in model.task_names}
    trainer = mk.Trainer(model, tasks, name, device="cpu", progress=False)
    before = trainer.evaluate([(x, y)]).losses
    for _ in range(30):
        trainer.train_step((x, y))
    after = trainer.evaluate([(x, y)]).losses
    assert sum(after.values()) < sum(before.values())


def test_a_parameter_in_neither_list_is_refused():
    model = CrossTaskHead()
    model.extra = torch.nn.Linear(2, 2)  # trained by nobody: a silently frozen layer
    with pytest.raises(ModelContractError, match="extra.weight"):
        check_parameter_split(model)
    with pytest.raises(ModelContractError, match="neither"):
        mk.Trainer(model, mk.TaskSet([mk.Task(t) for t in model.task_names]), device="cpu")


def test_a_ddp_like_wrapper_is_looked_through():
    model = CrossTaskHead()
    wrapped = torch.nn.DataParallel(model)
    out = forward_full(wrapped, torch.randn(3, 5))
    assert isinstance(out, MultiTaskOutput) and out.representation is not None
    assert mk.core.contract.shared_parameters(wrapped) == model.shared_parameters()


def test_plain_models_returning_a_dict_are_supported_without_a_representation():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(3, 4)
            self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})

        def forward(self, x):
            z = self.trunk(x)
            return {k: h(z).squeeze(-1) for k, h in self.heads.items()}

        def shared_parameters(self):
            return list(self.trunk.parameters())

    out = forward_full(Plain(), torch.randn(2, 3))
    assert out.representation is None and set(out.predictions) == {"a", "b"}


def test_the_representation_survives_a_real_ddp_wrapper(tmp_path):
    # one gloo process on the loopback: DDP's forward passes the named tuple through, the method
    # finds the shared parameters inside the wrapper, and the MGDA-UB step matches the bare model's
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        bare = CrossTaskHead().double()
        torch.manual_seed(0)
        wrapped = DistributedDataParallel(CrossTaskHead().double())
        tasks = mk.TaskSet([mk.Task(t) for t in bare.task_names])
        x = torch.randn(8, 5, dtype=torch.float64)
        y = {t: torch.randn(8, dtype=torch.float64) for t in bare.task_names}
        results = []
        for model in (bare, wrapped):
            out = forward_full(model, x)
            assert isinstance(out, MultiTaskOutput) and out.representation is not None
            info = mk.methods.create("mgda_ub").backward(tasks.losses(out.predictions, y), model, out)
            inner = getattr(model, "module", model)
            results.append((info.weights, [p.grad.clone() for p in inner.parameters()]))
        torch.testing.assert_close(results[0][0], results[1][0], atol=1e-12, rtol=0)
        for a, b in zip(results[0][1], results[1][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    finally:
        dist.destroy_process_group()


def _targets(model, n):
    tasks = FUNNEL if model.funnel else TASKS
    if model.funnel:
        first = (torch.rand(n, 1) < 0.5).float()
        return tasks, {"click": first, "buy": first * (torch.rand(n, 1) < 0.5).float()}
    return tasks, {"a": torch.randn(n, 1), "b": torch.randint(0, 3, (n,))}


STEP_METHODS = [
    ("ew", {}),
    ("mgda", {}),
    ("mgda", {"level": "representation"}),
    ("graddrop", {"level": "parameter"}),
    ("graddrop", {"level": "representation"}),
    ("famo", {}),
]


@pytest.mark.parametrize(
    "method", STEP_METHODS, ids=[f"{n}-{o.get('level', 'default')}" for n, o in STEP_METHODS]
)
@pytest.mark.parametrize("name", mk.models.available())
def test_every_architecture_trains_with_methods_at_both_levels(name, method):
    # a few Trainer steps through the contract: finite losses, every parameter that a loss or an
    # auxiliary loss reaches moves; a Jacobian aggregator at the representation level needs one
    # shared tensor and says so for per-task representations
    torch.manual_seed(0)
    model = registered(name)
    x = model.example_input(16)
    tasks, y = _targets(model, 16)
    method_name, options = method
    trainer = mk.Trainer(
        model, tasks, mk.methods.create(method_name, **options), device="cpu", progress=False
    )
    rep = model(x, full_output=True).representation
    per_task = not isinstance(rep, torch.Tensor) and model.shared_parameters()
    if method_name == "graddrop" and options["level"] == "representation" and per_task:
        with pytest.raises(mk.errors.EngineError, match="one per task"):
            trainer.train_step((x, y))
        return
    before = [p.detach().clone() for p in model.parameters()]
    ignored: set[str] = set(model.task_names)  # tasks a method gave weight 0 at every step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # soft sharing: "nothing shared" is announced once
        for _ in range(3):
            info = trainer.train_step((x, y))
            if info.weights is None:
                ignored.clear()
            else:
                ignored &= {t for t, w in zip(info.task_names, info.weights.tolist(), strict=True) if w == 0}
    assert torch.isfinite(info.losses).all()
    idle = {id(p) for t in ignored for p in model.task_parameters()[t]}  # MGDA may leave a task out
    moved = [
        not torch.equal(b, p)
        for b, p in zip(before, model.parameters(), strict=True)
        if p.requires_grad and id(p) not in idle
    ]
    frozen = [
        torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True) if not p.requires_grad
    ]
    assert all(frozen)  # a frozen backbone stays as it was
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(moved) >= 0.9 * len(moved), f"{len(moved) - sum(moved)} of {len(moved)} parameters never moved"


@pytest.mark.parametrize("name", mk.models.available())
def test_single_task_forward_runs_nothing_only_other_tasks_own(name):
    # forward(x, task=t) computes what t needs: no module that only other tasks own is called
    model = registered(name)
    specific = model.task_parameters()
    calls: list[str] = []
    hooks = []
    for mod_name, module in model.named_modules():
        own = {id(p) for p in module.parameters(recurse=False)}
        if own:
            hooks.append(module.register_forward_hook(lambda *_, n=mod_name: calls.append(n)))
    try:
        for t in model.task_names:
            mine = {id(p) for p in specific[t]}
            others = {id(p) for u, ps in specific.items() if u != t for p in ps} - mine
            calls.clear()
            model(model.example_input(3), task=t)
            ran = {n for n in calls}
            for mod_name, module in model.named_modules():
                own = {id(p) for p in module.parameters(recurse=False)}
                if own and own <= others:
                    assert mod_name not in ran, (
                        f"forward(task={t!r}) ran {mod_name}, which only other tasks own"
                    )
    finally:
        for h in hooks:
            h.remove()


def test_routing_statistics_and_auxiliary_losses_reach_the_step_logs(tmp_path):
    import csv

    torch.manual_seed(0)
    model = mk.models.create("dselect_k", in_features=6, tasks=TASKS, num_experts=5, out_features={"b": 3})
    x = torch.randn(32, 6)
    y = {"a": torch.randn(32, 1), "b": torch.randint(0, 3, (32,))}
    trainer = mk.Trainer(
        model, TASKS, "ew", device="cpu", progress=False, log_dir=tmp_path, log_every=1, tensorboard=False
    )
    trainer.fit([(x, y)] * 2, epochs=1)
    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and float(rows[-1]["model/gate/a/max"]) > 0
    assert float(rows[-1]["aux/dselect_reachable/a"]) > 0


def test_a_non_finite_auxiliary_loss_is_refused_before_anything_changes():
    model = mk.models.create("dselect_k", in_features=6, tasks=TASKS, num_experts=5, out_features={"b": 3})
    x = torch.randn(8, 6)
    y = {"a": torch.randn(8, 1), "b": torch.randint(0, 3, (8,))}
    out = model(x, full_output=True)
    aux = dict(out.aux_losses)
    aux["dselect_reachable/a"] = aux["dselect_reachable/a"] * float("nan")
    with pytest.raises(mk.errors.NonFiniteLossError, match="dselect_reachable/a"):
        mk.methods.create("mgda").backward(
            TASKS.losses(out.predictions, y), model, out._replace(aux_losses=aux)
        )
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", mk.models.available())
def test_a_registered_models_task_specific_parameters_are_reached_by_their_task_only(name):
    # the library's rule: what several tasks read is shared (the method combines their gradients
    # on it); a task's own parameters are listed under it alone and no other task's loss reaches them
    from mtlkit.core.engine import reachable_leaves

    model = registered(name)
    specific = model.task_parameters()
    owner: dict[int, str] = {}
    for t, params in specific.items():
        for p in params:
            assert id(p) not in owner, f"a parameter is listed under {owner[id(p)]!r} and {t!r}"
            owner[id(p)] = t
    out = model(model.example_input(4))
    for t in model.task_names:
        for p in reachable_leaves([out[t].sum()], set()):
            assert owner.get(id(p), t) == t, f"task {t!r} reaches a parameter of task {owner[id(p)]!r}"
