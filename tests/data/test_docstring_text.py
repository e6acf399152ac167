"""Text tasks from standard-library docstrings: real sentences with consistent labels."""

from __future__ import annotations

import torch

import mtlkit as mk
from mtlkit.data.docstring_text import MODULES, docstring_text


def test_the_docstring_tasks_have_real_sentences_and_consistent_labels():
    data = docstring_text()
    n = len(data.texts)
    assert n > 200 and len(set(data.texts)) == n  # no duplicate sentence
    assert all(len(t.split()) >= 4 for t in data.texts)  # first sentences of at least four words
    assert set(data.labels) == set(data.tasks.names) == {"module", "family", "kind"}
    families = torch.tensor(list(MODULES.values()), dtype=torch.float32)
    assert torch.equal(data.labels["family"], families[data.labels["module"]])  # family follows module
    assert set(torch.unique(data.labels["module"]).tolist()) == set(range(len(MODULES)))
    assert 0 < float(data.labels["kind"].mean()) < 1
    assert isinstance(data.tasks, mk.TaskSet)
