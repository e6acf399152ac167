"""Fisher merging: the per-example Fisher against a brute-force loop, and the merge's limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlkit as mk
from mtlkit.errors import ConfigError
from mtlkit.merging.fisher import FisherMerging, fisher_combine


def classifier(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def brute_force_fisher(model, xs, kind, labels=None):
    """One backward per example (and class, for the expected Fisher)."""
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i, x in enumerate(xs):
        logp = F.log_softmax(model(x.unsqueeze(0)), -1).squeeze(0)
        classes = range(3) if kind == "expected" else [int(labels[i])]
        for c in classes:
            grads = torch.autograd.grad(logp[c], list(model.parameters()), retain_graph=True)
            weight = float(logp[c].detach().exp()) if kind == "expected" else 1.0
            for (k, _), g in zip(model.named_parameters(), grads, strict=True):
                total[k] += weight * g.pow(2)
    return {k: v / len(xs) for k, v in total.items()}


@pytest.mark.parametrize("kind", ["expected", "empirical"])
def test_the_fisher_is_the_per_example_definition(kind):
    model = classifier(0)
    xs = torch.randn(10, 4, dtype=torch.float64)
    ys = torch.randint(0, 3, (10,))
    merger = FisherMerging(fisher=kind, chunk=4)
    merger.collect(0, "t", model, [(xs, ys)])
    want = brute_force_fisher(model, xs, kind, ys)
    for k, v in want.items():
        torch.testing.assert_close(merger._fishers[k][0], v, atol=1e-12, rtol=1e-9)


def test_equal_fishers_give_the_average_and_one_dominant_fisher_gives_its_model():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    ones = torch.ones(2)
    torch.testing.assert_close(fisher_combine([a, b], [ones, ones], [1.0, 1.0], 0.0), (a + b) / 2)
    big = torch.full((2,), 1e12)
    torch.testing.assert_close(fisher_combine([a, b], [big, ones], [1.0, 1.0], 0.0), a)


def test_fisher_merge_runs_on_modules_and_files_with_a_model_template(tmp_path):
    from safetensors.torch import save_file

    models = {"t0": classifier(1), "t1": classifier(2)}
    data = {name: [torch.randn(8, 4, dtype=torch.float64)] for name in models}
    out = mk.merging.merge(None, models, "fisher", data=data, max_examples=8).state_dict
    one = mk.merging.merge(None, {"t0": models["t0"]}, "fisher", data={"t0": data["t0"]}).state_dict
    for k, v in models["t0"].state_dict().items():
        torch.testing.assert_close(one[k], v)
    for name, m in models.items():
        save_file(m.state_dict(), str(tmp_path / f"{name}.safetensors"))
    files = {name: tmp_path / f"{name}.safetensors" for name in models}
    again = mk.merging.merge(None, files, "fisher", data=data, max_examples=8, model=classifier(3)).state_dict
    for k in out:
        assert torch.equal(out[k], again[k])
    with pytest.raises(ConfigError, match="needs \\(inputs, labels\\)"):
        mk.merging.merge(None, models, "fisher", fisher="empirical", data=data)
