"""The method contract, checked for every registered method (a new method is enrolled by
registering it): one task, missing labels, GradScaler transparency, state round trip without
aliasing, device and dtype moves, configuration round trip, bad input, lifecycle guards, and exact
resume inside the Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import mtlkit as mk
from mtlkit.errors import (
    CheckpointError,
    ConfigError,
    LifecycleError,
    NonFiniteLossError,
    NonPositiveLossError,
    TaskError,
    UnknownNameError,
)
from mtlkit.methods import Hook
from tests.conftest import make_problem
from tests.methods.helpers import assert_same_grads, grads, make_method, run_steps, supply_more_batches

NAMES = mk.methods.available()
#: methods that take logarithms of the losses
POSITIVE = {"si", "gls", "famo", "stch", "db_mtl", "epo"}
#: options under which every epoch-based method accumulates something within epoch 0
BUSY = {"stch": {"warmup_epochs": 0}, "gradnorm": {"initial": "first_epoch"}}


def model_for(name: str) -> str:
    """The test model for a method: one with modality branches where the method needs them."""
    return "modality" if mk.methods.method_class(name).model_requirement else "sb"


def shared_norm(net) -> float:
    return float(torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()]).norm())


def test_the_registry_has_every_method_and_close_matches():
    assert {"ew", "mgda", "mgda_ub", "upgrad", "famo"} <= set(NAMES)
    assert isinstance(mk.methods.create("MGDA", normalization="l2"), mk.methods.MGDA)
    with pytest.raises(UnknownNameError, match="Did you mean 'mgda'"):
        mk.methods.create("mdga")


@pytest.mark.parametrize("name", NAMES)
def test_one_task_works(name):
    tasks, net, x, y = make_problem(k=1, model=model_for(name))
    method = make_method(name, tasks, net)
    info = run_steps(method, tasks, net, x, y, steps=3)
    assert info.weights is None or (torch.isfinite(info.weights).all() and info.weights.item() > 0)
    assert math.isfinite(shared_norm(net)) and shared_norm(net) > 0


@pytest.mark.parametrize("name", NAMES)
def test_a_task_without_labels_gets_weight_zero_and_no_nan(name):
    tasks, net, x, y = make_problem(k=3, model=model_for(name))
    method = make_method(name, tasks, net)
    y = dict(y)
    y["t1"] = torch.full_like(y["t1"], float("nan"))  # no labelled sample for t1 in this batch
    for _, more in net.more_batches:  # (nor in the other batches of multi-batch methods)
        more["t1"] = torch.full_like(more["t1"], float("nan"))
    info = run_steps(method, tasks, net, x, y, steps=2)
    assert info.weights is None or (info.weights[1] == 0 and torch.isfinite(info.weights).all())
    for p in net.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert all(p.grad is None or not p.grad.abs().sum() for p in net.towers["t1"].parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_before_any_update(name, bad):
    tasks, net, x, y = make_problem(k=2, model=model_for(name))
    method = make_method(name, tasks, net)
    state = repr(method.state_dict())
    losses = dict(tasks.losses(net(x), y))
    losses["t1"] = losses["t1"] * bad
    if Hook.EPOCH_END in method.hooks:
        method.begin_epoch()
    with pytest.raises(NonFiniteLossError, match="t1"):
        method.backward(losses, net)
    assert all(p.grad is None for p in net.parameters())
    assert repr(method.state_dict()) == state


@pytest.mark.parametrize("name", NAMES)
def test_a_non_positive_loss_is_refused_or_handled(name):
    tasks, net, x, y = make_problem(k=2, model=model_for(name))
    method = make_method(name, tasks, net)
    state = repr(method.state_dict())
    out = net(x, full_output=True)
    losses = tasks.losses(out.predictions, y)
    bad = {"t0": losses["t0"], "t1": losses["t1"] * 0 - 1.0}
    if Hook.EPOCH_END in method.hooks:
        method.begin_epoch()
    if name in POSITIVE or name == "gradnorm":
        with pytest.raises(NonPositiveLossError, match="t1"):
            method.backward(bad, net, out)
        assert all(p.grad is None for p in net.parameters())
        assert repr(method.state_dict()) == state
    else:
        info = method.backward(bad, net, out)
        assert info.weights is None or torch.isfinite(info.weights).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_and_refuses_other_tasks_and_configurations(name):
    tasks, net, x, y = make_problem(k=3, model=model_for(name))
    a = make_method(name, tasks, net)
    run_steps(a, tasks, net, x, y, steps=3, method_lr=0.1, after_scale=0.9)
    b = make_method(name, tasks, net)
    b.load_state_dict(a.state_dict())
    for method in (a, b):
        net.zero_grad(set_to_none=True)
        if Hook.EPOCH_END in method.hooks:
            method.begin_epoch()
        out = net(x, full_output=True)
        info = method.backward(tasks.losses(out.predictions, y), net, out)
        method.result = (info.weights, grads(net))
    if a.result[0] is not None:
        torch.testing.assert_close(a.result[0], b.result[0], atol=0, rtol=0)
    assert_same_grads(a.result[1], b.result[1], atol=0, rtol=0)
    with pytest.raises(TaskError):
        make_method(name, mk.TaskSet([mk.Task("other", loss="mse")]), net).load_state_dict(a.state_dict())
    other_level = "parameter" if getattr(a, "level", None) == "representation" else "representation"
    cls = mk.methods.method_class(name)
    if "level" in cls._hparams and cls._hparams["level"].check(other_level):
        with pytest.raises(CheckpointError, match="level"):  # e.g. mgda into mgda_ub
            make_method(name, tasks, net, level=other_level).load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_state_is_never_aliased(name):
    # neither the method that saved a state nor the one that loaded it changes the saved dict later
    tasks, net, x, y = make_problem(k=3, model=model_for(name))
    a = make_method(name, tasks, net, **BUSY.get(name, {}))
    run_steps(a, tasks, net, x, y, steps=2, epoch_every=10**6)  # mid-epoch: running sums in the state
    saved = a.state_dict()
    frozen = repr(saved)
    b = make_method(name, tasks, net, **BUSY.get(name, {}))
    b.load_state_dict(saved)
    for method in (a, b):
        run_steps(method, tasks, net, x, y, steps=2, method_lr=0.1, after_scale=0.9)
    assert repr(saved) == frozen


@pytest.mark.parametrize("name", NAMES)
def test_state_lives_in_buffers_parameters_and_extra_state(name):
    # no tensor hides in a plain attribute, where .to() and state_dict() would not see it
    tasks, net, x, y = make_problem(k=3, model=model_for(name))
    method = make_method(name, tasks, net)
    run_steps(method, tasks, net, x, y, steps=2)
    hidden = [k for k, v in vars(method).items() if isinstance(v, Tensor)]
    assert hidden == [], hidden
    method.to(torch.float32)
    assert all(t.dtype != torch.float64 for t in method.parameters())
    moved = method.to("meta")
    assert moved is method
    assert all(t.device.type == "meta" for t in [*method.parameters(), *method.buffers()])


@pytest.mark.parametrize("name", NAMES)
def test_gradscaler_loss_scale_is_transparent(name):
    # With losses multiplied by S and loss_scale=S, every gradient (model and method parameters)
    # is exactly S times the unscaled one and the weights are unchanged: what GradScaler expects.
    tasks, net, x, y = make_problem(k=3, model=model_for(name))
    scale = 2.0**10
    runs = []
    for s in (None, scale):
        torch.manual_seed(1)  # RLW draws its seed from the global generator
        method = make_method(name, tasks, net)
        if Hook.EPOCH_END in method.hooks:
            method.begin_epoch()
        net.zero_grad(set_to_none=True)
        out = net(x, full_output=True)
        losses = tasks.losses(out.predictions, y)
        if s is not None:
            losses = losses.map(lambda v, s=s: v * s)
        info = method.backward(losses, net, out, loss_scale=s)
        method_grads = [p.grad.clone() for p in method.parameters() if p.grad is not None]
        runs.append((info.weights, info.losses, grads(net), method_grads))
    (w0, l0, g0, m0), (w1, l1, g1, m1) = runs
    if w0 is not None:
        torch.testing.assert_close(w1, w0)
    torch.testing.assert_close(l1, l0)
    assert_same_grads(g1, [g * scale if g is not None else None for g in g0], atol=1e-9, rtol=1e-9)
    assert len(m0) == len(m1)
    for a, b in zip(m0, m1, strict=True):
        torch.testing.assert_close(b, a * scale)


@pytest.mark.parametrize("name", NAMES)
def test_configuration_round_trips_and_bad_options_are_named(name):
    method = mk.methods.create(name)
    cls = mk.methods.method_class(name)
    again = cls(**{k: v for k, v in method.hparams().items()})
    assert again.config() == method.config() and repr(again) == repr(method)
    assert eval(repr(method), {type(method).__name__: cls}).config() == method.config()
    declared = list(cls._hparams)
    if not declared:
        with pytest.raises(ConfigError, match="Unknown option"):
            mk.methods.create(name, lr=1)
        return
    typo = declared[-1][:-1] + "x"
    with pytest.raises(ConfigError, match=f"Did you mean '{declared[-1]}'"):
        mk.methods.create(name, **{typo: 1})
    with pytest.raises(ConfigError, match="must be"):
        mk.methods.create(name, **{declared[-1]: object()})


@pytest.mark.parametrize("name", NAMES)
def test_a_changed_task_set_and_non_scalar_losses_are_refused(name):
    tasks, net, _, _ = make_problem(k=2, model=model_for(name))
    method = make_method(name, tasks, net)
    if Hook.EPOCH_END in method.hooks:
        method.begin_epoch()
    with pytest.raises(TaskError, match="set up for tasks"):
        method.backward({"other": torch.ones((), requires_grad=True)}, net)
    with pytest.raises(TaskError, match="scalar"):
        method.backward(
            {"t0": torch.ones(3, requires_grad=True), "t1": torch.ones((), requires_grad=True)}, net
        )
    with pytest.raises(TaskError, match="no task losses"):
        method.backward({}, net)


@pytest.mark.parametrize("name", NAMES)
def test_losses_as_a_list_or_a_dict_are_the_same_step(name):
    tasks, net, x, y = make_problem(k=2, model=model_for(name))
    method = make_method(name, tasks, net)
    for as_list in (False, True, False):
        out = net(x, full_output=True)
        losses = tasks.losses(out.predictions, y)
        if Hook.EPOCH_END in method.hooks and not method._epoch_open:
            method.begin_epoch()
        net.zero_grad(set_to_none=True)
        method.backward(list(losses.values()) if as_list else losses, net, out)
        for p in method.parameters():
            p.grad = None
        if Hook.AFTER_STEP in method.hooks:
            with torch.no_grad():
                new = tasks.losses(net(x), y)
                method.after_step(list(new.values()) if not as_list else new)


@pytest.mark.parametrize("name", NAMES)
def test_a_skipped_lifecycle_call_is_an_error_on_the_next_step(name):
    tasks, net, x, y = make_problem(k=2, model=model_for(name))
    cls = mk.methods.method_class(name)
    method = supply_more_batches(mk.methods.create(name), tasks, net)
    losses = lambda: tasks.losses(net(x), y)  # noqa: E731
    if cls.needs_setup:
        with pytest.raises(LifecycleError, match="setup"):
            method.backward(losses(), net)
        method.setup(tasks, model=net)
    if Hook.EPOCH_END in method.hooks:
        with pytest.raises(LifecycleError, match="begin_epoch"):
            method.backward(losses(), net)
        method.begin_epoch()
        with pytest.raises(LifecycleError, match="without on_epoch_end"):
            method.begin_epoch()
    out = net(x, full_output=True)
    method.backward(tasks.losses(out.predictions, y), net, out)
    if any(True for _ in method.parameters()):  # its parameters were never given to an optimiser
        torch.optim.SGD(net.parameters(), lr=1e-3).step()  # an optimiser of the model alone stepped
        with pytest.raises(LifecycleError, match="no optimiser"):
            method.backward(losses(), net, net(x, full_output=True))
        for p in method.parameters():
            p.grad = None
    if Hook.AFTER_STEP in method.hooks:
        with pytest.raises(LifecycleError, match="after_step"):
            method.backward(losses(), net, net(x, full_output=True))


@pytest.mark.parametrize("name", NAMES)
def test_needs_setup_is_declared_by_every_method_with_parameters(name):
    tasks, net, _, _ = make_problem(k=2, model=model_for(name))
    method = mk.methods.create(name)
    method.setup(tasks, model=net)
    if any(True for _ in method.parameters()):
        assert method.needs_setup


@pytest.mark.parametrize("name", NAMES)
def test_trainer_resumes_a_killed_run_exactly(name, tmp_path):
    """A crash mid-epoch 2 (inside every method's second phase where it has one) resumes to the
    uninterrupted run's weights and method state, bit for bit."""
    data = mk.data.load_mmoe_synthetic(n_train=96, n_val=32, n_test=32, correlation=0.5, dim=6, seed=1)
    options = {"stch": {"warmup_epochs": 1}, "gradnorm": {"initial": "first_epoch"}}.get(name, {})

    def trainer(path, **kw):
        torch.manual_seed(0)
        if model_for(name) == "modality":
            model = mk.models.ModalityFusion(
                6, data.tasks, modality_dims=[4, 2], encoder_dims=[8], trunk_dims=[8], tower_dims=[4]
            )
        else:
            model = mk.models.MMoE(6, data.tasks, num_experts=2, expert_dims=[8], tower_dims=[4])
        method = mk.methods.create(name, **options)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return mk.Trainer(
            model,
            data.tasks,
            method,
            opt,
            device="cpu",
            log_dir=path,
            progress=False,
            tensorboard=False,
            seed=3,
            **kw,
        )

    def loader():
        return mk.data.loader(data.train, 32, shuffle=True)

    ref = trainer(tmp_path / "ref")
    ref.fit(loader(), epochs=3)

    class Crash(RuntimeError):
        pass

    def killing():
        for i, batch in enumerate(loader()):
            if i == 1 and crashed.epoch == 2:
                raise Crash
            yield batch

    class Killing:
        def __len__(self):
            return 3

        def __iter__(self):
            return killing()

    crashed = trainer(tmp_path / "run", checkpoint_every=1)
    with pytest.raises(Crash):
        crashed.fit(Killing(), epochs=3)
    resumed = trainer(tmp_path / "run", checkpoint_every=1)
    resumed.fit(loader(), epochs=3)
    per_epoch = 3 // ref.method.batches_per_step  # 3 batches per epoch, grouped per step
    assert resumed.step == ref.step == 3 * per_epoch
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), (name, k)
    assert repr(ref.method.state_dict()) == repr(resumed.method.state_dict())
