"""Lifecycle details: auxiliary losses, gradient accumulation, aborted epochs, the Driver."""

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import LifecycleError, NonPositiveLossError
from tests.models.toy_models import CrossTaskHead


class WithAux(CrossTaskHead):
    """CrossTaskHead plus an auxiliary penalty on the shared representation."""

    def forward_tasks(self, x, tasks):
        out = super().forward_tasks(x, tasks)
        return mk.MultiTaskOutput(
            out.predictions, out.representation, {"l2": 0.3 * out.representation.pow(2).mean()}
        )


def problem():
    torch.manual_seed(0)
    net = WithAux().double()
    tasks = mk.TaskSet([mk.Task(t) for t in net.task_names])
    x = torch.randn(8, 5, dtype=torch.float64)
    y = {t: torch.randn(8, dtype=torch.float64) for t in net.task_names}
    return tasks, net, x, y


@pytest.mark.parametrize("name", ["ew", "mgda", "mgda_ub"])
def test_aux_losses_have_weight_one_and_follow_the_gradscaler_scale(name):
    tasks, net, x, y = problem()
    runs = []
    for scale in (None, 2.0**10):
        net.zero_grad(set_to_none=True)
        out = net(x, full_output=True)
        losses = tasks.losses(out.predictions, y)
        if scale is not None:
            losses = losses.map(lambda v, s=scale: v * s)
        mk.methods.create(name).backward(losses, net, out, loss_scale=scale)
        runs.append([p.grad.clone() / (scale or 1.0) for p in net.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # EW: the update is the gradient of sum_k L_k + aux
    net.zero_grad(set_to_none=True)
    out = net(x, full_output=True)
    (sum(tasks.losses(out.predictions, y).values()) + out.aux_losses["l2"]).backward()
    if name == "ew":
        for a, p in zip(runs[0], net.parameters(), strict=True):
            torch.testing.assert_close(a, p.grad, atol=1e-12, rtol=1e-10)


def test_a_refused_step_writes_no_aux_gradient():
    tasks, net, x, y = problem()
    out = net(x, full_output=True)
    losses = dict(tasks.losses(out.predictions, y))
    losses["b"] = losses["b"] * 0  # a zero loss: MGDA's loss normalisation refuses it
    with pytest.raises(NonPositiveLossError):
        mk.methods.MGDA(normalization="loss").backward(losses, net, out)
    assert all(p.grad is None for p in net.parameters())


def test_gradient_accumulation_is_allowed_and_a_missing_optimiser_is_still_found():
    tasks, net, x, y = problem()
    method = mk.methods.UW()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    driver = mk.methods.Driver(method, net, opt, tasks)
    for _ in range(2):
        opt.zero_grad()
        for _ in range(3):  # three micro-batches per optimiser step
            out = net(x, full_output=True)
            driver.backward(tasks.losses(out.predictions, y), out)
        opt.step()
    alone = mk.methods.UW()
    alone.setup(tasks, model=net)
    model_only = torch.optim.SGD(net.parameters(), lr=1e-2)  # the method's parameters are missing
    model_only.zero_grad()
    out = net(x, full_output=True)
    alone.backward(tasks.losses(out.predictions, y), net, out)
    model_only.step()
    model_only.zero_grad()
    out = net(x, full_output=True)
    with pytest.raises(LifecycleError, match="no optimiser"):
        alone.backward(tasks.losses(out.predictions, y), net, out)


def test_an_aborted_epoch_can_be_run_again():
    tasks, net, x, y = problem()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    driver = mk.methods.Driver(mk.methods.DWA(), net, opt, tasks)
    with pytest.raises(RuntimeError, match="boom"), driver.epoch():
        raise RuntimeError("boom")
    with driver.epoch():  # not "begin_epoch() was called again without on_epoch_end()"
        out = net(x, full_output=True)
        driver.backward(tasks.losses(out.predictions, y), out)


def test_a_trainer_can_fit_again_after_a_crash_mid_epoch(tmp_path):
    data = mk.data.load_mmoe_synthetic(n_train=96, n_val=32, n_test=32, dim=6, seed=1)
    model = mk.models.MMoE(6, data.tasks, num_experts=2, expert_dims=[8], tower_dims=[4])
    trainer = mk.Trainer(
        model,
        data.tasks,
        "dwa",
        device="cpu",
        log_dir=tmp_path,
        progress=False,
        tensorboard=False,
        checkpoint_every=1,
    )

    def crashing():
        for i, batch in enumerate(mk.data.loader(data.train, 32)):
            if i == 2:
                raise RuntimeError("crash")
            yield batch

    with pytest.raises(RuntimeError, match="crash"):
        trainer.fit(crashing(), epochs=2)
    trainer.fit(mk.data.loader(data.train, 32), epochs=2)  # the same Trainer, resumed in-process
    assert trainer.step == 6 and trainer.epoch == 2


def test_aux_losses_without_a_model_find_their_parameters_from_the_graph():
    tasks, net, x, y = problem()
    out = net(x, full_output=True)
    mk.methods.create("ew").backward(tasks.losses(out.predictions, y), output=out)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    out = net(x, full_output=True)
    (sum(tasks.losses(out.predictions, y).values()) + out.aux_losses["l2"]).backward()
    for a, p in zip(got, net.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-12, rtol=1e-10)
