"""Rep-MTL: the spec's gradient-flow, entropy and alignment identities, exact agreement of the
regulariser's gradient with an independent double-backward, reuse of the saliency passes by a
representation-level base, and missing labels."""

from __future__ import annotations

import math

import pytest
import torch

import mtlkit as mk
from mtlkit.core.engine import GradientEngine
from mtlkit.errors import EngineError
from mtlkit.methods.rep_mtl import saliency_alignment, saliency_entropy, task_saliency_distribution
from tests.conftest import make_problem


def step_grads(method, tasks, net, x, y):
    net.zero_grad(set_to_none=True)
    method.setup(tasks, model=net)
    out = net(x, full_output=True)
    info = method.backward(tasks.losses(out.predictions, y), net, out)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()], info


def reference_penalty(net, tasks, x, y, lam_tsr, lam_csa, tau, active=None):
    """TSR and CSA written out with plain autograd (create_graph), independently of the engine."""
    out = net(x, full_output=True)
    z = out.representation
    losses = tasks.losses(out.predictions, y)
    names = [n for i, n in enumerate(tasks.names) if active is None or active[i]]
    sal = torch.stack([torch.autograd.grad(losses[n], z, create_graph=True)[0] for n in names])
    a = sal.abs().unsqueeze(-1) if sal.dim() == 2 else sal.abs()  # (A, B, C)
    p = a / a.sum(0, keepdim=True).clamp_min(1e-12)  # 0 log 0 = 0 where no task reaches an entry
    tsr = -(p * p.clamp_min(1e-12).log()).sum(0).mean()
    num_tasks, batch, _ = a.shape
    v = torch.nn.functional.normalize(a.transpose(0, 1).reshape(batch * num_tasks, -1), dim=1, eps=1e-12)
    total = 0.0
    for r in range(batch * num_tasks):
        sims = [(v[r] @ v[c]) / tau for c in range(batch * num_tasks) if c != r]
        pos = [
            (v[r] @ v[c]) / tau
            for c in range(batch * num_tasks)
            if c != r and c // num_tasks == r // num_tasks
        ]
        total = total + torch.logsumexp(torch.stack(sims), 0) - torch.logsumexp(torch.stack(pos), 0)
    csa = total / (batch * num_tasks)
    return lam_tsr * tsr + lam_csa * csa


def test_the_regulariser_gradient_matches_an_independent_double_backward():
    tasks, net, x, y = make_problem(k=3)
    lam_tsr, lam_csa, tau = 0.7, 0.3, 0.5
    rep, _ = step_grads(
        mk.methods.create("rep_mtl", lambda_tsr=lam_tsr, lambda_csa=lam_csa, tau=tau), tasks, net, x, y
    )
    ew, _ = step_grads(mk.methods.create("ew"), tasks, net, x, y)
    penalty = reference_penalty(net, tasks, x, y, lam_tsr, lam_csa, tau)
    expected = torch.autograd.grad(penalty, list(net.parameters()), allow_unused=True)
    for got, base, exp in zip(rep, ew, expected, strict=True):
        exp = torch.zeros_like(got) if exp is None else exp
        torch.testing.assert_close(got - base, exp, atol=1e-10, rtol=1e-8)
    trunk = [
        g - b
        for g, b, p in zip(rep, ew, net.parameters(), strict=True)
        if any(p is q for q in net.shared_parameters())
    ]
    assert max(float(t.abs().max()) for t in trunk) > 1e-6  # the regulariser reaches the encoder


def test_without_the_double_backward_the_encoder_would_get_nothing():
    # the spec's gradient-flow test: the saliency must stay a function of the model
    tasks, net, x, y = make_problem(k=2)
    out = net(x, full_output=True)
    losses = tasks.losses(out.predictions, y)
    detached = torch.stack(
        [torch.autograd.grad(losses[n], out.representation, retain_graph=True)[0] for n in tasks.names]
    )
    _, p = task_saliency_distribution(detached)
    assert not saliency_entropy(p).requires_grad
    live = GradientEngine().representation_saliency(list(losses.values()), out.representation)
    _, p = task_saliency_distribution(live)
    grads = torch.autograd.grad(saliency_entropy(p), net.shared_parameters(), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_entropy_identities():
    s = torch.rand(1, 4, 3, 5, 5, dtype=torch.float64) + 0.1
    _, p = task_saliency_distribution(torch.cat([s, s]))
    assert float(saliency_entropy(p)) == pytest.approx(math.log(2), abs=1e-15)
    _, p = task_saliency_distribution(torch.cat([s, torch.zeros_like(s)]))  # a disconnected head
    assert float(saliency_entropy(p)) == 0.0


def test_alignment_is_minimal_for_matching_profiles_and_grows_when_shuffled():
    batch, tau = 4, 0.2
    profiles = torch.eye(batch, dtype=torch.float64)  # orthogonal across samples
    a = torch.stack([profiles, profiles])  # the same across tasks: (2, B, C)
    expected = math.log(math.exp(1 / tau) + 2 * (batch - 1)) - 1 / tau
    assert float(saliency_alignment(a, tau)) == pytest.approx(expected, rel=1e-12)
    shuffled = torch.stack([profiles, profiles[torch.tensor([1, 2, 3, 0])]])
    assert float(saliency_alignment(shuffled, tau)) > expected + 1.0


def test_a_representation_level_base_reuses_the_saliency_passes(monkeypatch):
    tasks, net, x, y = make_problem(k=3)
    plain, _ = step_grads(mk.methods.create("mgda_ub"), tasks, net, x, y)
    method = mk.methods.create("rep_mtl", base="mgda_ub", lambda_tsr=0.0, lambda_csa=0.0)

    def no_more_passes(*args, **kwargs):
        raise AssertionError("the base ran its own per-task backward passes")

    monkeypatch.setattr(GradientEngine, "_per_task_loop", no_more_passes)
    reused, info = step_grads(method, tasks, net, x, y)
    for a, b in zip(plain, reused, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert info.weights is not None
    _, info = step_grads(mk.methods.create("rep_mtl", base="mgda_ub"), tasks, net, x, y)
    assert float(info.extras["tsr"]) > 0  # and with the regulariser on, still no extra pass


def test_tasks_without_labels_are_left_out_of_the_regulariser():
    tasks, net, x, y = make_problem(k=3)
    y = dict(y)
    y["t1"] = torch.full_like(y["t1"], float("nan"))
    rep, _ = step_grads(
        mk.methods.create("rep_mtl", lambda_tsr=1.0, lambda_csa=0.5, tau=0.5), tasks, net, x, y
    )
    ew, _ = step_grads(mk.methods.create("ew"), tasks, net, x, y)
    penalty = reference_penalty(net, tasks, x, y, 1.0, 0.5, 0.5, active=[True, False, True])
    expected = torch.autograd.grad(penalty, list(net.parameters()), allow_unused=True)
    for got, base, exp in zip(rep, ew, expected, strict=True):
        exp = torch.zeros_like(got) if exp is None else exp
        torch.testing.assert_close(got - base, exp, atol=1e-10, rtol=1e-8)


def test_a_model_without_one_shared_representation_is_refused():
    tasks, net, x, y = make_problem(k=2)
    method = mk.methods.create("rep_mtl")
    method.setup(tasks, model=net)
    with pytest.raises(EngineError, match="full_output"):
        method.backward(tasks.losses(net(x), y), net)


@pytest.mark.parametrize("base", ["uw", "famo", "dwa", "upgrad"])
def test_bases_with_parameters_post_step_and_epoch_hooks_train_inside_rep_mtl(base, tmp_path):
    data = mk.data.load_mmoe_synthetic(n_train=128, n_val=32, n_test=32, dim=6, seed=0)
    torch.manual_seed(0)
    model = mk.models.MMoE(6, data.tasks, num_experts=2, expert_dims=[8], tower_dims=[4])
    method = mk.methods.create("rep_mtl", base=base)
    trainer = mk.Trainer(
        model, data.tasks, method, device="cpu", progress=False, log_dir=tmp_path, tensorboard=False
    )
    trainer.fit(mk.data.loader(data.train, 32, shuffle=True), epochs=2)
    own = list(method.base_method.parameters())
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in own)
    assert trainer.step == 8


def test_the_chunked_alignment_equals_the_whole_matrix_and_its_gradient():
    a = torch.rand(3, 10, 5, dtype=torch.float64, requires_grad=True)
    whole = saliency_alignment(a, 0.3, chunk=1000)
    (g_whole,) = torch.autograd.grad(whole, a)
    chunked = saliency_alignment(a, 0.3, chunk=4)  # 30 anchors in chunks of 4 (the last one short)
    (g_chunked,) = torch.autograd.grad(chunked, a)
    torch.testing.assert_close(chunked, whole, atol=1e-14, rtol=0)
    torch.testing.assert_close(g_chunked, g_whole, atol=1e-14, rtol=0)
