"""FULLER: the spec's modality-level identity (equal norms, unchanged directions at the branch
inputs), the task-level rule at the last shared layer, the calibration's inactivity under other
methods, the modality-bias toy, and refusals."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError, EngineError
from tests.conftest import make_problem


def branch_gradients(model):
    """Record the gradient that reaches each modality encoder's output in the next backward."""
    seen: dict[int, torch.Tensor] = {}

    def hook(i):
        def on_output(module, args, out):
            out.register_hook(lambda g: seen.__setitem__(i, g.detach().clone()))

        return on_output

    handles = [enc.register_forward_hook(hook(i)) for i, enc in enumerate(model.encoders)]
    return seen, handles


def one_step(method, tasks, net, x, y):
    seen, handles = branch_gradients(net)
    net.zero_grad(set_to_none=True)
    method.setup(tasks, model=net)
    out = net(x, full_output=True)
    info = method.backward(tasks.losses(out.predictions, y), net, out)
    for h in handles:
        h.remove()
    return seen, info


def test_calibrated_branch_gradients_have_equal_norms_and_unchanged_directions():
    tasks, net, x, y = make_problem(k=2, model="modality", batch=16, in_features=8)
    plain, _ = one_step(mk.methods.create("imtl_g", level="representation"), tasks, net, x, y)
    calibrated, info = one_step(mk.methods.create("fuller"), tasks, net, x, y)
    norms = [float(calibrated[i].norm()) for i in range(2)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    before = [float(plain[i].norm()) for i in range(2)]
    assert abs(before[0] - before[1]) > 1e-3 * max(before)  # there was something to calibrate
    assert sum(norms) == pytest.approx(sum(before), rel=1e-9)  # the mean target keeps the total
    for i in range(2):
        cos = torch.nn.functional.cosine_similarity(plain[i].flatten(), calibrated[i].flatten(), dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-12)
    assert info.extras["branch_norms"] == pytest.approx(before, rel=1e-9)


def test_the_task_level_rule_balances_gradients_of_very_different_norms():
    tasks, net, x, y = make_problem(k=2, model="modality", batch=16, in_features=8)
    method = mk.methods.create("fuller")
    method.setup(tasks, model=net)
    out = net(x, full_output=True)
    losses = tasks.losses(out.predictions, y)
    scaled = {"t0": losses["t0"], "t1": losses["t1"] * 100.0}
    z = out.representation
    g = [torch.autograd.grad(v, z, retain_graph=True)[0].flatten() for v in scaled.values()]
    info = method.backward(scaled, net, out)
    d = info.weights[0] * g[0] + info.weights[1] * g[1]
    cos = [float(torch.nn.functional.cosine_similarity(d, gk, dim=0)) for gk in g]
    assert float(g[1].norm() / g[0].norm()) > 20
    assert cos[0] == pytest.approx(cos[1], abs=1e-9)  # IMTL-G: equal projections on unit gradients


def test_the_calibration_is_inactive_under_other_methods():
    tasks, net, x, y = make_problem(k=2, model="modality", batch=16, in_features=8)
    seen, info = one_step(mk.methods.create("imtl_g", level="representation"), tasks, net, x, y)
    assert net.calibration.last_norms is None
    # the same weighted loss back-propagated by hand reaches the branches unchanged
    plain, handles = branch_gradients(net)
    out = net(x, full_output=True)
    losses = tasks.losses(out.predictions, y)
    (info.weights[0] * losses["t0"] + info.weights[1] * losses["t1"]).backward()
    for h in handles:
        h.remove()
    for i in range(2):
        torch.testing.assert_close(seen[i], plain[i], atol=1e-12, rtol=1e-10)


def test_modality_bias_the_weak_branch_trains_more_under_fuller():
    data = mk.data.load_modality_bias(n_train=4000, n_val=10, n_test=10, scales=(1.0, 1.0), weak_share=0.1)

    def movement(name, seed):
        torch.manual_seed(seed)
        model = mk.models.ModalityFusion(
            16,
            data.tasks,
            modality_dims=data.modality_dims,
            encoder_dims=[32],
            trunk_dims=[32],
            tower_dims=[16],
        )
        start = [[p.detach().clone() for p in e.parameters()] for e in model.encoders]
        method = (
            mk.methods.create(name, level="representation") if name != "fuller" else mk.methods.create(name)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=3e-2)
        trainer = mk.Trainer(model, data.tasks, method, optimizer, device="cpu", progress=False, seed=seed)
        trainer.fit(mk.data.loader(data.train, 64, shuffle=True), epochs=5)
        with torch.no_grad():
            moved = [
                sum(float((p - q).pow(2).sum()) for p, q in zip(e.parameters(), s, strict=True)) ** 0.5
                for e, s in zip(model.encoders, start, strict=True)
            ]
        return moved[1] / moved[0]  # weak branch's movement relative to the strong one's

    for seed in (0, 1):
        assert movement("fuller", seed) > 1.3 * movement("imtl_g", seed)


def test_bad_set_ups_are_named():
    with pytest.raises(ConfigError, match="level='representation'"):
        mk.methods.create("fuller", base_options={"level": "parameter"})
    with pytest.raises(ConfigError, match="gradient method"):
        mk.methods.create("fuller", base="ew")
    tasks, net, x, y = make_problem(k=2)  # a shared-bottom model: no modality branches
    method = mk.methods.create("fuller")
    method.setup(tasks, model=net)
    out = net(x, full_output=True)
    with pytest.raises(EngineError, match="ModalityGradientCalibration"):
        method.backward(tasks.losses(out.predictions, y), net, out)
    assert all(p.grad is None for p in net.parameters())
