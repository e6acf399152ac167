"""ParetoGNN: the spec's MGDA identity and Pareto-stationarity tests on pretext gradients of a
plain-PyTorch GCN, the invariance of the weights to a task's loss scale, and pretraining on a
stochastic block model that does at least as well as the worse single pretext task."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.core.engine import GradientEngine
from mtlkit.data.graphs import PretextLoader, edge_set, sample_non_edges, sbm_graph, split_edges
from mtlkit.metrics.embedding_probe import linear_probe_accuracy, link_auc
from mtlkit.models.gcn import GraphPretext


def problem(seed=0, tasks=("link", "recon")):
    graph = sbm_graph((40, 40, 40), p_in=0.15, p_out=0.01, feature_dim=8, feature_signal=0.3, seed=seed)
    train_edges, test_edges = split_edges(graph, 0.1, seed=seed)
    loader = PretextLoader(graph, train_edges, tasks, steps_per_epoch=10, edges_per_step=64, seed=seed)
    torch.manual_seed(seed)
    model = GraphPretext(8, loader.tasks, encoder_dims=(32, 16), head_dim=32).double()
    return graph, train_edges, test_edges, loader, model


def encoder_gradients(model, batch, tasks, scale=None):
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    targets = {k: v.double() for k, v in batch.targets.items()}
    out = model(inputs, full_output=True)
    losses = tasks.losses(out.predictions, targets)
    values = [losses[n] * (scale or {}).get(n, 1.0) for n in tasks.names]
    rows = GradientEngine().jacobian(values, model.shared_parameters()).rows().clone()
    return rows, values


def test_mgda_weights_on_unit_gradients_satisfy_the_two_task_identity():
    _, _, _, loader, model = problem()
    batch = next(iter(loader))
    rows, _ = encoder_gradients(model, batch, loader.tasks)
    u = rows / rows.norm(dim=1, keepdim=True)
    gram = u @ u.T
    alpha1 = float(((u[1] - u[0]) @ u[1]) / ((u[0] - u[1]) @ (u[0] - u[1])))
    alpha1 = min(1.0, max(0.0, alpha1))
    w = mk.methods.min_norm_weights(gram.double())
    assert float(w[0]) == pytest.approx(alpha1, abs=1e-9)
    d = w[0] * u[0] + w[1] * u[1]
    for k in range(2):
        assert float(d @ u[k]) >= float(d @ d) - 1e-9  # a common descent direction


def test_opposite_gradients_are_pareto_stationary():
    c = 3.0
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for normalization, expected in (("none", c / (1 + c)), ("l2", 0.5)):
        theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        method = mk.methods.create("mgda", normalization=normalization)
        info = method.backward({"a": g @ theta + 1, "b": -c * g @ theta + 1}, shared=[theta])
        assert float(info.weights[0]) == pytest.approx(expected, abs=1e-12)
        if normalization == "none":
            assert float(theta.grad.norm()) < 1e-12  # no update direction on the shared part


def test_paretognn_weights_ignore_a_task_loss_scale_of_100():
    _, _, _, loader, model = problem(tasks=("link", "recon", "ming"))
    batch = next(iter(loader))
    weights, grads = [], []
    for scale in (None, {"recon": 100.0}):
        for final in (False, True):
            method = mk.methods.create("paretognn", normalize_final=final)
            method.setup(loader.tasks, model=model)
            model.zero_grad(set_to_none=True)
            inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.inputs.items()}
            out = model(inputs, full_output=True)
            losses = loader.tasks.losses(out.predictions, {k: v.double() for k, v in batch.targets.items()})
            scaled = {n: v * (scale or {}).get(n, 1.0) for n, v in losses.items()}
            info = method.backward(scaled, model, out)
            weights.append(info.weights)
            grads.append(torch.cat([p.grad.flatten() for p in model.shared_parameters()]))
    assert float(weights[0].max() - weights[0].min()) > 0.01  # three tasks: not the trivial 1/2, 1/2
    torch.testing.assert_close(weights[0], weights[2], atol=1e-9, rtol=0)  # the same alpha
    # the min-norm weights of the unit gradients are the same; with normalize_final the update is too
    torch.testing.assert_close(grads[1], grads[3], atol=1e-10, rtol=1e-7)
    assert not torch.allclose(grads[0], grads[2])  # official convention: the raw gradients are combined


def pretrain(tasks, method, seed=0):
    graph, train_edges, test_edges, _, _ = problem(seed)
    loader = PretextLoader(graph, train_edges, tasks=tasks, steps_per_epoch=20, edges_per_step=64, seed=seed)
    torch.manual_seed(seed)
    model = GraphPretext(8, loader.tasks, encoder_dims=(32, 16), head_dim=32)
    trainer = mk.Trainer(model, loader.tasks, method, device="cpu", progress=False, seed=seed)
    trainer.fit(loader, epochs=5)
    with torch.no_grad():
        z = model.embed(graph.features, loader.adj)
    nodes = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(1))
    acc = linear_probe_accuracy(z, graph.labels, nodes[:60], nodes[60:])
    generator = torch.Generator().manual_seed(2)
    negatives = sample_non_edges(edge_set(graph.edges), graph.num_nodes, test_edges.shape[1], generator)
    return acc, link_auc(z, test_edges, negatives)


def test_multi_task_pretraining_does_at_least_as_well_as_the_worse_single_task():
    single = [pretrain([t], "ew") for t in ("link", "recon", "ming")]
    both = pretrain(["link", "recon", "ming"], "paretognn")
    assert both[0] >= min(s[0] for s in single) - 0.02
    assert both[1] >= min(s[1] for s in single) - 0.02
    assert both[0] > 0.6  # chance: 1/3


def test_the_propagation_matrix_and_the_karate_club():
    from mtlkit.data.graphs import karate_club, normalized_adjacency

    graph = karate_club()
    assert graph.num_nodes == 34 and graph.edges.shape == (2, 78) and graph.labels.sum() == 17
    adj = normalized_adjacency(graph.edges, 34).to_dense()
    dense = torch.zeros(34, 34)
    dense[graph.edges[0], graph.edges[1]] = 1
    dense = dense + dense.T + torch.eye(34)
    d = dense.sum(1).rsqrt()
    torch.testing.assert_close(adj, d[:, None] * dense * d[None, :])


def test_representation_level_methods_refuse_the_corrupted_pass():
    _, _, _, loader, model = problem(tasks=("link", "ming"))
    trainer = mk.Trainer(model.float(), loader.tasks, "mgda_ub", device="cpu", progress=False)
    with pytest.raises(mk.errors.EngineError, match="representation"):
        trainer.fit(loader, epochs=1)
