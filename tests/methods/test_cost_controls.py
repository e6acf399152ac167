"""Cost controls of every Gramian method: task subsampling (a named approximation) and weight
reuse between solves."""

import torch

import mtlkit as mk
from mtlkit.methods.min_norm import min_norm_weights
from tests.conftest import make_problem
from tests.core.test_engine import brute_force
from tests.methods.helpers import shared_grad


def test_task_sampling_solves_on_a_random_subset_and_trains_every_head():
    tasks, net, x, y = make_problem(k=6)
    J, heads, _ = brute_force(net, tasks, x, y)
    method = mk.methods.create("mgda", task_sample=3, task_sample_seed=5)
    info = method.backward(tasks.losses(net(x), y), net)
    pick = info.extras["sampled_tasks"]
    assert len(pick) == 3 and (info.weights != 0).sum() == 3
    assert set((info.weights != 0).nonzero().squeeze(1).tolist()) == set(pick.tolist())
    w = min_norm_weights(J[pick] @ J[pick].T)
    torch.testing.assert_close(info.weights[pick], w, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(shared_grad(net), J[pick].T @ w, atol=1e-10, rtol=1e-8)
    weights = {int(k): float(v) for k, v in zip(pick, w, strict=True)}
    for k, t in enumerate(tasks.names):  # sampled heads: weighted (MGDA's convention); others: own
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, weights.get(k, 1.0) * ref, atol=1e-10, rtol=1e-8)
    assert torch.isnan(info.gramian[[k for k in range(6) if k not in pick.tolist()]]).all()


def test_task_sampling_is_reproducible_and_resumes_exactly():
    tasks, net, x, y = make_problem(k=8)
    a = mk.methods.create("upgrad", task_sample=4)
    picks = [a.backward(tasks.losses(net(x), y), net).extras["sampled_tasks"] for _ in range(2)]
    b = mk.methods.create("upgrad", task_sample=4)
    b.setup(tasks)
    b.load_state_dict(a.state_dict())
    c = mk.methods.create("upgrad", task_sample=4)
    c.setup(tasks)
    c.load_state_dict(a.state_dict())
    nxt = [m.backward(tasks.losses(net(x), y), net).extras["sampled_tasks"] for m in (a, b, c)]
    assert torch.equal(nxt[0], nxt[1]) and torch.equal(nxt[1], nxt[2])
    assert not all(torch.equal(picks[0], p) for p in (picks[1], nxt[0]))  # it does move


def test_task_sampling_leaves_unlabelled_tasks_out_and_is_off_for_few_tasks():
    tasks, net, x, y = make_problem(k=4)
    y = dict(y)
    y["t2"] = torch.full_like(y["t2"], float("nan"))
    info = mk.methods.create("mgda", task_sample=2).backward(tasks.losses(net(x), y), net)
    assert 2 not in info.extras["sampled_tasks"].tolist() and info.weights[2] == 0
    info = mk.methods.create("mgda", task_sample=3).backward(tasks.losses(net(x), y), net)
    assert "sampled_tasks" not in info.extras  # three labelled tasks: nothing to sample


def test_task_sampling_at_the_representation_level():
    tasks, net, x, y = make_problem(k=5)
    out = net(x, full_output=True)
    info = mk.methods.create("mgda_ub", task_sample=2).backward(tasks.losses(out.predictions, y), net, out)
    pick = info.extras["sampled_tasks"].tolist()
    assert len(pick) == 2 and set(info.weights.nonzero().squeeze(1).tolist()) <= set(pick)
    assert torch.isclose(info.weights.sum(), torch.ones((), dtype=torch.float64))
    assert torch.isfinite(shared_grad(net)).all()
