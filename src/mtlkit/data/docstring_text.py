"""Text tasks from data that ships with every Python: the docstrings of standard-library modules.

Each sample is the first sentence of one public function's or class's docstring in one of the
chosen modules, with three labels: which module it documents (``module``), whether that module
processes text and data formats or works with the system and time (``family``), and whether it
documents a class or a function (``kind``). The texts depend on the Python version that runs
(recorded in :attr:`DocstringText.python`).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import dataclass

import torch

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError

#: the modules and their family (0: text and data formats, 1: system, files and time)
MODULES = {
    "re": 0,
    "json": 0,
    "string": 0,
    "textwrap": 0,
    "csv": 0,
    "os": 1,
    "shutil": 1,
    "datetime": 1,
    "subprocess": 1,
    "pathlib": 1,
}


@dataclass
class DocstringText:
    texts: list[str]
    labels: dict[str, torch.Tensor]
    tasks: TaskSet
    python: str


def docstring_text(modules: dict[str, int] | None = None, min_words: int = 4) -> DocstringText:
    """The samples of every public function and class (and their public methods) in ``modules``
    whose docstring's first sentence has at least ``min_words`` words, duplicates dropped."""
    modules = modules or MODULES
    texts: list[str] = []
    module_label, family, kind = [], [], []
    seen: set[str] = set()
    for index, (name, fam) in enumerate(modules.items()):
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) not in (name, f"_{name}", "posix"):
                continue
            members = [(obj, inspect.isclass(obj))]
            if inspect.isclass(obj):
                members += [
                    (m, False) for a, m in sorted(vars(obj).items()) if not a.startswith("_") and callable(m)
                ]
            for member, is_class in members:
                sentence = _first_sentence(inspect.getdoc(member) or "")
                if len(sentence.split()) < min_words or sentence in seen:
                    continue
                seen.add(sentence)
                texts.append(sentence)
                module_label.append(index)
                family.append(fam)
                kind.append(int(is_class))
    if not texts:
        raise ConfigError("No docstring sentence found in the chosen modules.")
    labels = {
        "module": torch.tensor(module_label),
        "family": torch.tensor(family, dtype=torch.float32),
        "kind": torch.tensor(kind, dtype=torch.float32),
    }
    tasks = TaskSet(
        [
            Task("module", "ce", metrics=["accuracy"]),
            Task("family", "bce", metrics=["accuracy"]),
            Task("kind", "bce", metrics=["accuracy"]),
        ]
    )
    return DocstringText(texts, labels, tasks, sys.version.split()[0])


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text).strip()
