"""Code in the documentation runs as written."""

import re
from pathlib import Path

import pytest
import torch

import mtlkit as mk

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("name", mk.methods.available())
def test_weightings_user_loop_runs(name):
    if mk.methods.create(name).batches_per_step > 1:
        pytest.skip("uses several batches per step: see test_the_multi_batch_loop_runs")
    if mk.methods.method_class(name).model_requirement:
        pytest.skip("needs a model with modality branches: its example is in docs/schemes.md (tested)")
    code = re.findall(r"```python\n(.*?)```", (DOCS / "weightings.md").read_text(), re.S)[0]
    data = mk.data.load_mmoe_synthetic(n_train=256, n_val=64, n_test=64, dim=12)
    model = mk.models.MMoE(12, data.tasks, num_experts=2, expert_dims=[8], tower_dims=[4])
    before = [p.detach().clone() for p in model.shared_parameters()]
    namespace = {
        "mk": mk,
        "torch": torch,
        "name": name,
        "tasks": data.tasks,
        "model": model,
        "loader": mk.data.loader(data.train, 64, shuffle=True),
        "epochs": 3,
    }
    exec(compile(code, "docs/weightings.md", "exec"), namespace)
    info = namespace["info"]  # aggregators whose direction is not J^T w report no weights
    assert info.weights is None or torch.isfinite(info.weights).all()
    assert all(not torch.equal(a, b) for a, b in zip(model.shared_parameters(), before, strict=True))


def test_every_gradient_method_is_in_the_aggregator_table_and_its_examples_build():
    from mtlkit.methods import GramianWeighting, JacobianAggregator

    text = (DOCS / "aggregators.md").read_text()
    table = text.split("## Options")[0]
    for name in mk.methods.available():
        if issubclass(mk.methods.method_class(name), (GramianWeighting, JacobianAggregator)):
            assert f"`{name}`" in table, name
    calls = re.findall(r"mk\.methods\.create\((.*?)\)\s", text)
    assert len(calls) >= 15
    for call in calls:  # every documented construction is valid
        eval(f"mk.methods.create({call})", {"mk": mk})


@pytest.mark.parametrize("options", [("modo", {}), ("sdmgrad", {"independent_batches": True})])
def test_the_multi_batch_loop_runs(options):
    name, kwargs = options
    block = [
        b
        for b in re.findall(r"```python\n(.*?)```", (DOCS / "aggregators.md").read_text(), re.S)
        if "extra_losses" in b
    ]
    data = mk.data.load_mmoe_synthetic(n_train=96, n_val=32, n_test=32, dim=6)
    model = mk.models.MMoE(6, data.tasks, num_experts=2, expert_dims=[8], tower_dims=[4])
    method = mk.methods.create(name, **kwargs)
    namespace = {
        "mk": mk,
        "tasks": data.tasks,
        "model": model,
        "method": method,
        "three_batches": list(mk.data.loader(data.train, 32))[:3],
    }
    exec(compile(block[0], "docs/aggregators.md", "exec"), namespace)
    assert torch.isfinite(namespace["info"].weights).all()
    assert all(p.grad is not None for p in model.shared_parameters())


def test_every_model_is_in_the_architecture_table_and_the_example_runs():
    text = (DOCS / "architectures.md").read_text()
    table = text.split("## The gated-expert family")[0]
    for name in mk.models.available():
        assert f"| `{name}` |" in table, name
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    exec(compile(code, "docs/architectures.md", "exec"), {})


def test_every_merging_method_is_in_the_merging_table_and_the_example_runs():
    text = (DOCS / "merging.md").read_text()
    for name in mk.merging.available():
        assert f"| `{name}` |" in text, name
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    exec(compile(code, "docs/merging.md", "exec"), {})


@pytest.mark.parametrize(
    "page",
    [
        "schemes.md",
        "relatedness.md",
        "decentralized.md",
        "pareto.md",
        "integrations.md",
        "getting-started.md",
    ],
)
def test_the_runnable_examples_of_a_page_run(page):
    text = (DOCS / page).read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "import mtlkit as mk" in b]
    assert blocks
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), {})


def test_every_estimator_is_in_the_estimator_table_and_the_example_runs():
    text = (DOCS / "estimators.md").read_text()
    table = text.split("## Tasks")[0]
    for name in mk.estimators.ESTIMATORS.available():
        assert f"| `{name}` |" in table, name
    namespace: dict = {}
    exec(compile(re.findall(r"```python\n(.*?)```", text, re.S)[0], "docs/estimators.md", "exec"), namespace)
    assert namespace["model"].outlier_tasks_.tolist() == namespace["outliers"].tolist()
    assert namespace["search"].best_params_["gamma"] in (1.0, 10.0)
