"""RegMean: the closed form equals the least-squares merge; its limits; the data path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mtlkit as mk
from mtlkit.errors import ConfigError


def experts_and_data(tasks=3, seed=0):
    torch.manual_seed(seed)
    models = {
        f"t{i}": nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double() for i in range(tasks)
    }
    data = {
        name: [torch.randn(16, 5, dtype=torch.float64) * (1 + i) for _ in range(3)]
        for i, name in enumerate(models)
    }
    return models, data


def layer_inputs(model, batches, index):
    """Inputs of the model's index-th Linear, stacked over batches."""
    seen = []
    hook = [m for m in model if isinstance(m, nn.Linear)][index].register_forward_hook(
        lambda m, i, o: seen.append(i[0])
    )
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    return torch.cat(seen)


def test_regmean_is_the_least_squares_solution_of_the_stacked_problem():
    models, data = experts_and_data()
    out = mk.merging.merge(None, models, "regmean", alpha=1.0, ridge=0.0, data=data).state_dict
    for idx, key in ((0, "0.weight"), (1, "2.weight")):
        xs = [layer_inputs(m, data[n], idx) for n, m in models.items()]
        # minimise sum_t ||X_t W^T - X_t W_t^T||^2 / N_t: rows weighted by 1/sqrt(N_t)
        a = torch.cat([x / x.shape[0] ** 0.5 for x in xs])
        b = torch.cat(
            [x @ models[n].state_dict()[key].T / x.shape[0] ** 0.5 for x, n in zip(xs, models, strict=True)]
        )
        want = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(out[key], want, atol=1e-9, rtol=1e-9)
    bias = sum(m.state_dict()["0.bias"] for m in models.values()) / 3
    torch.testing.assert_close(out["0.bias"], bias)


def test_regmean_with_diagonal_grams_is_a_per_input_feature_weighted_average():
    models, data = experts_and_data(tasks=2)
    out = mk.merging.merge(None, models, "regmean", alpha=0.0, ridge=0.0, data=data).state_dict
    xs = [layer_inputs(m, data[n], 0) for n, m in models.items()]
    d = [(x * x).mean(0) for x in xs]  # diag(G_t)
    ws = [m.state_dict()["0.weight"] for m in models.values()]
    want = (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1])
    torch.testing.assert_close(out["0.weight"], want, atol=1e-10, rtol=1e-10)


def test_regmean_on_expert_files_with_a_model_template(tmp_path):
    models, data = experts_and_data(tasks=2)
    files = {}
    for name, m in models.items():
        save_file(m.state_dict(), str(tmp_path / f"{name}.safetensors"))
        files[name] = tmp_path / f"{name}.safetensors"
    from_modules = mk.merging.merge(None, models, "regmean", data=data).state_dict
    template = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    from_files = mk.merging.merge(None, files, "regmean", data=data, model=template).state_dict
    for k in from_modules:
        assert torch.equal(from_modules[k], from_files[k])
    with pytest.raises(ConfigError, match="pass model="):
        mk.merging.merge(None, files, "regmean", data=data)
    with pytest.raises(ConfigError, match="needs data"):
        mk.merging.merge(None, models, "regmean")
    with pytest.raises(ConfigError, match="no data for expert"):
        mk.merging.merge(None, models, "regmean", data={"t0": data["t0"]})


def test_regmean_plusplus_takes_later_layers_grams_on_the_merged_models_activations():
    models, data = experts_and_data()
    plus = mk.merging.merge(None, models, "regmean_plusplus", alpha=1.0, ridge=0.0, data=data).state_dict
    plain = mk.merging.merge(None, models, "regmean", alpha=1.0, ridge=0.0, data=data).state_dict
    # the first layer reads the raw inputs in both
    torch.testing.assert_close(plus["0.weight"], plain["0.weight"], atol=1e-10, rtol=1e-10)
    # the last layer: least squares on the merged first layer's activations
    first = nn.Linear(5, 4).double()
    first.load_state_dict({"weight": plus["0.weight"], "bias": plus["0.bias"]})
    xs = [torch.tanh(first(torch.cat(data[n]))).detach() for n in models]
    a = torch.cat([x / x.shape[0] ** 0.5 for x in xs])
    b = torch.cat(
        [
            x @ models[n].state_dict()["2.weight"].T / x.shape[0] ** 0.5
            for x, n in zip(xs, models, strict=True)
        ]
    )
    torch.testing.assert_close(plus["2.weight"], torch.linalg.lstsq(a, b).solution.T, atol=1e-9, rtol=1e-9)
    assert not torch.allclose(plus["2.weight"], plain["2.weight"])
    with pytest.raises(ConfigError, match="nn.Sequential"):

        class Wrapped(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x)

        mk.merging.merge(None, {n: Wrapped(m) for n, m in models.items()}, "regmean_plusplus", data=data)


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_regmean_refuses_a_model_without_linear_layers(method):
    """It would silently be weight averaging (e.g. on a convolutional network)."""

    def conv() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten())

    data = {"a": [torch.randn(4, 1, 3, 3)], "b": [torch.randn(4, 1, 3, 3)]}
    with pytest.raises(ConfigError, match="no nn.Linear"):
        mk.merging.merge(None, {"a": conv(), "b": conv()}, method, data=data)
