"""Helpers shared by the method tests."""

from __future__ import annotations

import torch

import mtlkit as mk
from mtlkit.core.tasks import TaskLosses


def grads(net):
    return [p.grad.clone() if p.grad is not None else None for p in net.parameters()]


def shared_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()])


def reference_grads(net, objective):
    """Gradients of an explicit scalar objective, for comparison with a method's backward."""
    net.zero_grad(set_to_none=True)
    objective.backward()
    out = grads(net)
    net.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert (x is None and y is None) or torch.count_nonzero(x if x is not None else y) == 0
        else:
            torch.testing.assert_close(x, y, **(tol or {"atol": 1e-12, "rtol": 1e-10}))


def setup(method, tasks, net):
    """Set up ``method`` for a float64 test model (its own parameters in float64 too)."""
    method.setup(tasks, model=net)
    method.double()
    return method


def make_method(name, tasks, net, **options):
    return supply_more_batches(setup(mk.methods.create(name, **options), tasks, net), tasks, net)


def supply_more_batches(method, tasks, net):
    """Fill what a method's ``backward`` needs beyond the losses unless a test passes it: for a
    method that uses several batches per step, ``extra_losses`` from ``net.more_batches`` (see
    ``make_problem``); for a method that re-runs the model (``needs_closure``), a ``closure`` that
    recomputes the losses on the last inputs and targets seen (scaled like the step's losses)."""
    n = method.batches_per_step
    closure = method.needs_closure
    if (n == 1 or not hasattr(net, "more_batches")) and not closure:
        return method
    last = {}
    if closure:
        net.register_forward_pre_hook(lambda module, args: last.__setitem__("x", args[0]))
        plain = tasks.losses

        def recording(predictions, targets, *args, **kwargs):
            last["y"] = targets
            return plain(predictions, targets, *args, **kwargs)

        tasks.losses = recording
    original = method.backward

    def backward(losses, *args, **kwargs):
        scale = kwargs.get("loss_scale") or 1.0
        if n > 1 and "extra_losses" not in kwargs:
            kwargs["extra_losses"] = [
                tasks.losses(net(x), y).map(lambda v: v * scale) for x, y in net.more_batches[: n - 1]
            ]
        if closure and "closure" not in kwargs:
            kwargs["closure"] = lambda: (
                tasks.losses(net(last["x"]), last["y"]).map(lambda v: v * scale),
                None,
            )
        return original(losses, *args, **kwargs)

    method.backward = backward
    return method


def fixed_losses(values):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]


def step(method, losses, net=None, output=None, after=None):
    """One raw step with the lifecycle a caller owes: the epoch is opened when needed, the
    method's own gradients are dropped afterwards, and ``after_step`` gets ``after`` (default:
    the same losses) for methods with that hook."""
    if mk.methods.Hook.EPOCH_END in method.hooks and not method._epoch_open:
        method.begin_epoch()
    info = method.backward(losses, net, output) if net is not None else method.backward(losses)
    for p in method.parameters():
        p.grad = None
    if mk.methods.Hook.AFTER_STEP in method.hooks:
        with torch.no_grad():
            method.after_step(after if after is not None else [v.detach() for v in _values(losses)])
    return info


def _values(losses):
    return list(losses.values()) if isinstance(losses, dict) or hasattr(losses, "labelled") else list(losses)


def end_epoch(method):
    if not method._epoch_open:
        method.begin_epoch()
    method.on_epoch_end()


def run_steps(method, tasks, net, x, y, steps, method_lr=0.0, after_scale=1.0, epoch_every=1):
    """``steps`` method steps with every lifecycle call (the model itself is not updated; with
    ``method_lr`` the method's own parameters take SGD steps). Returns the last StepInfo."""
    info = None
    for i in range(steps):
        if not method._epoch_open:
            method.begin_epoch()
        net.zero_grad(set_to_none=True)
        out = net(x, full_output=True)
        info = method.backward(tasks.losses(out.predictions, y), net, out)
        for p in method.parameters():
            if method_lr and p.grad is not None:
                p.data -= method_lr * p.grad
            p.grad = None
        if mk.methods.Hook.AFTER_STEP in method.hooks:
            with torch.no_grad():
                new = tasks.losses(net(x), y)
                method.after_step(new if after_scale == 1.0 else new.map(lambda v: v * after_scale))
        if (i + 1) % epoch_every == 0:
            method.on_epoch_end()
    return info


def linear_step(method, C, b=None, labelled=None):
    """One step on ``L_k = <C_k, theta> + b_k`` at ``theta = 0`` (``b`` default ones): the task
    gradients are exactly ``C_k`` and the losses ``b_k``. Returns ``(theta.grad, StepInfo)``."""
    theta = torch.zeros(C.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.ones(len(C), dtype=torch.float64) if b is None else b
    losses = {f"t{k}": C[k] @ theta + b[k] for k in range(len(C))}
    if labelled is not None:
        losses = TaskLosses(losses, torch.tensor(labelled))
    info = method.backward(losses, shared=[theta])
    return theta.grad, info
