"""Each engine path equals a brute-force per-task loop to 1e-10 in float64."""

import pytest
import torch

from mtlkit.core.engine import GradientEngine, accumulate_gramian
from mtlkit.errors import EngineError
from tests.conftest import make_problem


def brute_force(net, tasks, x, y):
    """Per task: a fresh forward and backward; returns J (K x d), head grads, rep grads H (K x B*r)."""
    shared = net.shared_parameters()
    rows, heads, reps = [], [], []
    for t in tasks.names:
        net.zero_grad(set_to_none=True)
        full = net(x, full_output=True)
        out, z = full.predictions, full.representation
        z.retain_grad()
        tasks.losses(out, y)[t].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
        heads.append([p.grad.clone() for p in net.task_parameters()[t]])
        reps.append(z.grad.reshape(-1).clone())
    net.zero_grad(set_to_none=True)
    return torch.stack(rows), heads, torch.stack(reps)


@pytest.mark.parametrize("model", ["sb", "mmoe"])
@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("chunk", [7 * 8 * 4, 1 << 22])
@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_parameter_gramian_and_jacobian_match_brute_force(model, strategy, chunk, precision):
    tasks, net, x, y = make_problem(k=4, model=model)
    J, _, _ = brute_force(net, tasks, x, y)
    engine = GradientEngine(strategy, precision=precision, chunk_bytes=chunk)
    losses = tasks.losses(net(x), y)
    gram, jac = engine.parameter_gramian(
        list(losses.values()), net.shared_parameters(), net.task_parameters()
    )
    assert gram.dtype == torch.float64
    torch.testing.assert_close(jac.flat(), J, atol=1e-10, rtol=0)
    torch.testing.assert_close(gram, J @ J.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("head_grad", ["own", "weighted"])
def test_parameter_level_writes_JTw_and_head_gradients(strategy, head_grad):
    tasks, net, x, y = make_problem(k=3)
    J, heads, _ = brute_force(net, tasks, x, y)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    _, jac = GradientEngine(strategy).parameter_gramian(
        list(tasks.losses(net(x), y).values()), net.shared_parameters(), net.task_parameters()
    )
    jac.write_shared_weighted(w)
    jac.write_heads(w if head_grad == "weighted" else None)
    got = torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()])
    torch.testing.assert_close(got, J.T @ w, atol=1e-10, rtol=0)
    for k, t in enumerate(tasks.names):
        scale = w[k] if head_grad == "weighted" else 1.0
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, scale * ref, atol=1e-10, rtol=0)


def test_jacobian_path_writes_any_direction():
    """Path (c): methods that need J itself get the blocks and write one direction per parameter."""
    tasks, net, x, y = make_problem(k=3)
    J, _, _ = brute_force(net, tasks, x, y)
    jac = GradientEngine().jacobian(list(tasks.losses(net(x), y).values()), net.shared_parameters())
    torch.testing.assert_close(jac.flat(), J, atol=1e-10, rtol=0)
    # e.g. an elementwise rule no Gramian can express: the per-coordinate median of the task gradients
    jac.write_shared([b.median(dim=0).values for b in jac.blocks])
    got = torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()])
    torch.testing.assert_close(got, J.median(dim=0).values, atol=1e-12, rtol=0)


def test_task_specific_parameters_found_from_the_graph():
    tasks, net, x, y = make_problem(k=3, model="mmoe")
    losses = list(tasks.losses(net(x), y).values())
    _, explicit = GradientEngine().parameter_gramian(losses, net.shared_parameters(), net.task_parameters())
    losses = list(tasks.losses(net(x), y).values())
    _, found = GradientEngine().parameter_gramian(losses, net.shared_parameters(), None)
    explicit_ids = {id(p) for ps in net.task_parameters().values() for p in ps}
    assert {id(p) for p in found.heads.params} == explicit_ids
    found.write_heads(None)
    own = {id(p): p.grad.clone() for p in found.heads.params}
    net.zero_grad(set_to_none=True)
    explicit.write_heads(None)
    for p in explicit.heads.params:
        torch.testing.assert_close(p.grad, own[id(p)], atol=1e-12, rtol=0)


@pytest.mark.parametrize("model", ["sb", "mmoe"])
@pytest.mark.parametrize("discover", [False, True])
def test_representation_gramian_and_trunk_backward_match_brute_force(model, discover):
    tasks, net, x, y = make_problem(k=4, model=model)
    J, heads, H = brute_force(net, tasks, x, y)
    out = net(x, full_output=True)
    losses = list(tasks.losses(out.predictions, y).values())
    engine = GradientEngine(chunk_bytes=5 * 8 * 4)
    gram, rep = engine.representation_gramian(
        losses, out.representation, tasks.names, None if discover else net.task_parameters()
    )
    torch.testing.assert_close(gram, H @ H.T, atol=1e-10, rtol=0)
    w = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    rep.backward_shared(w)
    rep.write_heads(None)
    got = torch.cat([p.grad.reshape(-1) for p in net.shared_parameters()])
    torch.testing.assert_close(got, J.T @ w, atol=1e-10, rtol=0)  # trunk VJP of sum_k w_k h_k
    for k, t in enumerate(tasks.names):
        for p, ref in zip(net.task_parameters()[t], heads[k], strict=True):
            torch.testing.assert_close(p.grad, ref, atol=1e-10, rtol=0)


def test_each_head_is_backpropagated_once_per_step():
    """No hidden O(K^2): task k's backward never visits the other heads."""
    tasks, net, x, y = make_problem(k=5)
    calls = dict.fromkeys(tasks.names, 0)
    for t in tasks.names:
        net.towers[t].register_full_backward_hook(lambda *a, t=t: calls.__setitem__(t, calls[t] + 1))
    losses = list(tasks.losses(net(x), y).values())
    GradientEngine("loop").parameter_gramian(losses, net.shared_parameters(), net.task_parameters())
    assert calls == dict.fromkeys(tasks.names, 1)


@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_gramian_is_float64_for_float32_models(precision):
    tasks, net, x, y = make_problem(k=3, dtype=torch.float32)
    gram, jac = GradientEngine(precision=precision).parameter_gramian(
        list(tasks.losses(net(x), y).values()), net.shared_parameters()
    )
    assert gram.dtype == torch.float64 and jac.blocks[0].dtype == torch.float32
    J = jac.flat().double()
    norms = J.norm(dim=1)
    tol = 1e-12 if precision == "float64" else 1e-6  # mixed: float32 sums within one chunk
    assert ((gram - J @ J.T).abs() / (norms[:, None] * norms[None, :]).clamp_min(1e-30)).max() < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_are_multiplied_in_float32(dtype):
    block = torch.full((2, 1000), 100.0, dtype=dtype)  # products sum to 1e7: inf in float16
    for precision in ("mixed", "float64"):
        gram = accumulate_gramian([block], 2, precision=precision)
        torch.testing.assert_close(gram, torch.full((2, 2), 1e7, dtype=torch.float64), rtol=1e-6, atol=0)


def test_accumulate_gramian_chunking_is_exact():
    a = torch.randn(3, 11, dtype=torch.float64)
    b = torch.randn(3, 2, 2, dtype=torch.float64)
    ref = a @ a.T + b.reshape(3, -1) @ b.reshape(3, -1).T
    for chunk in (1, 3 * 8 * 3, 3 * 8 * 4, 10_000):
        torch.testing.assert_close(accumulate_gramian([a, b], 3, chunk), ref, atol=1e-14, rtol=0)


def test_engine_errors():
    tasks, net, x, y = make_problem(k=2)
    losses = list(tasks.losses(net(x), y).values())
    with pytest.raises(EngineError, match="No trainable shared"):
        GradientEngine().parameter_gramian(losses, [])
    with pytest.raises(EngineError, match="non-leaf"):
        GradientEngine().representation_gramian(losses, torch.zeros(3))
    with pytest.raises(EngineError, match="strategy"):
        GradientEngine("fast")
    with pytest.raises(EngineError, match="precision"):
        GradientEngine(precision="half")


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_task_gradient_norms_match_brute_force(strategy):
    tasks, net, x, y = make_problem(k=4, model="mmoe")
    layer = net.last_shared_parameters()
    y = dict(y)
    y["t2"] = torch.full_like(y["t2"], float("nan"))  # no label: no gradient, norm 0
    values = list(tasks.losses(net(x), y).values())
    ref = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, layer, retain_graph=True)]).norm()
            if v.requires_grad
            else torch.zeros((), dtype=torch.float64)
            for v in values
        ]
    )
    norms = GradientEngine(strategy).task_gradient_norms(values, layer)
    assert norms.dtype == torch.float64 and norms[2] == 0
    torch.testing.assert_close(norms, ref, atol=1e-12, rtol=1e-12)
    values[0].backward()  # the graph was kept


# -- splits that are not a tree, per-task representations, owned buffers ------------------------------
def _toy(model_cls, dtype=torch.float64):
    import mtlkit as mk

    torch.manual_seed(0)
    net = model_cls().to(dtype)
    tasks = mk.TaskSet([mk.Task(t, loss="mse") for t in net.task_names])
    x = torch.randn(6, 5, dtype=dtype)
    y = {t: torch.randn(6, dtype=dtype) for t in net.task_names}
    return tasks, net, x, y


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("head_grad", ["own", "weighted"])
def test_a_parameter_feeding_several_tasks_gets_all_their_gradients(strategy, head_grad):
    from tests.models.toy_models import CrossTaskHead

    tasks, net, x, y = _toy(CrossTaskHead)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    losses = tasks.losses(net(x), y)
    scale = w if head_grad == "weighted" else torch.ones(3, dtype=torch.float64)
    ref = torch.autograd.grad(
        sum(s * v for s, v in zip(scale, losses.values(), strict=True)), net.pair.weight
    )[0]
    losses = list(tasks.losses(net(x), y).values())
    _, jac = GradientEngine(strategy).parameter_gramian(
        losses, net.shared_parameters(), net.task_parameters()
    )
    jac.write_heads(w if head_grad == "weighted" else None)
    # "pair" is listed under task a only, but task b reads it too: both gradients arrive
    torch.testing.assert_close(net.pair.weight.grad, ref, atol=1e-12, rtol=0)


def test_per_task_representations_give_the_aligned_gramian_and_an_exact_trunk_backward():
    from tests.models.toy_models import PerTaskRepresentation

    tasks, net, x, y = _toy(PerTaskRepresentation)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    out = net(x, full_output=True)
    losses = tasks.losses(out.predictions, y)
    g = [torch.autograd.grad(losses[t], out.representation[t], retain_graph=True)[0] for t in tasks.names]
    H = torch.stack([v.reshape(-1) for v in g])
    objective = sum(wk * v for wk, v in zip(w, losses.values(), strict=True))
    ref = torch.autograd.grad(objective, net.shared_parameters(), retain_graph=True)
    gram, rep = GradientEngine().representation_gramian(
        list(losses.values()), out.representation, tasks.names
    )
    torch.testing.assert_close(gram, H @ H.T, atol=1e-12, rtol=0)
    rep.backward_shared(w)
    for p, r in zip(net.shared_parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r, atol=1e-12, rtol=0)


def test_a_task_reading_another_tasks_representation_is_refused():
    from tests.models.toy_models import PerTaskRepresentation

    tasks, net, x, y = _toy(PerTaskRepresentation)
    net.leak = True
    out = net(x, full_output=True)
    losses = list(tasks.losses(out.predictions, y).values())
    with pytest.raises(EngineError, match="reads representation\\['a'\\]"):
        GradientEngine().representation_gramian(losses, out.representation, tasks.names)
    with pytest.raises(EngineError, match="one entry per task"):
        GradientEngine().representation_gramian(losses, {"a": out.representation["a"]}, tasks.names)


def test_owned_jacobians_are_not_overwritten_by_the_next_call():
    tasks, net, x, y = make_problem(k=3)
    engine = GradientEngine("loop")
    first = engine.jacobian(list(tasks.losses(net(x), y).values()), net.shared_parameters(), owned=True)
    kept = first.rows().clone()
    reused = engine.jacobian(list(tasks.losses(net(x * 2), y).values()), net.shared_parameters())
    engine.jacobian(list(tasks.losses(net(x * 3), y).values()), net.shared_parameters())
    torch.testing.assert_close(first.rows(), kept, atol=0, rtol=0)
    assert not torch.equal(reused.rows()[:, :5], kept[:, :5])  # the engine's own buffer was reused


def test_task_specific_parameters_below_a_per_task_representation_get_their_own_gradient_once():
    # the toy's gates are task-specific and lie below each task's representation (as PLE's task
    # experts or MTAN's attention): with the split and the shared list given, the trunk backward
    # writes the shared parameters only, and each gate gets its own (or weighted) gradient once
    from tests.models.toy_models import PerTaskRepresentation

    tasks, net, x, y = _toy(PerTaskRepresentation)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    out = net(x, full_output=True)
    losses = tasks.losses(out.predictions, y)
    objective = sum(wk * v for wk, v in zip(w, losses.values(), strict=True))
    shared = net.shared_parameters()
    ref_shared = torch.autograd.grad(objective, shared, retain_graph=True)
    ref_heads = {
        t: torch.autograd.grad(losses[t], net.task_parameters()[t], retain_graph=True) for t in tasks.names
    }
    _, rep = GradientEngine().representation_gramian(
        list(losses.values()), out.representation, tasks.names, net.task_parameters(), shared
    )
    rep.backward_shared(w)
    rep.write_heads(None)
    for p, r in zip(shared, ref_shared, strict=True):
        torch.testing.assert_close(p.grad, r, atol=1e-12, rtol=0)
    for t in tasks.names:
        for p, r in zip(net.task_parameters()[t], ref_heads[t], strict=True):
            torch.testing.assert_close(p.grad, r, atol=1e-12, rtol=0)
