"""``torch.compile`` for multi-task models, part by part, so that every method works on the result.

Compiling a whole multi-task model makes its forward one autograd node whose outputs are the
representation and every prediction at once. A task's loss then no longer reaches the
representation *through* the graph (its gradient w.r.t. the representation is ``None``), so
representation-level methods cannot work, and the graph no longer shows which head a loss reads.
:func:`compile_parts` compiles each part instead -- every direct child module that holds
parameters, and each entry of a ``ModuleList``/``ModuleDict`` child (the experts, the towers) --
in place: the representation stays a real cut between compiled graphs, parameter names and
``state_dict`` keys do not change, and checkpoints stay interchangeable with the eager model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def allow_repeated_backward() -> None:
    """Let compiled backward graphs run more than once on one forward: per-task gradients take K
    backward passes through the shared part with ``retain_graph``, which a compiled graph with
    donated buffers refuses. A process-wide torch setting (it only gives up reusing saved
    activations' memory as gradient buffers in the compiled backward)."""
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False


def compile_parts(model: nn.Module, **options: Any) -> nn.Module:
    """Compile ``model``'s parts in place with ``torch.compile(**options)`` and return it.

    The model's own ``forward`` stays eager Python (it only routes tensors between the parts), so
    its representation and the contract's ``shared_parameters()``/``task_parameters()`` are kept.
    """
    allow_repeated_backward()
    for part in _parts(model):
        part.forward = torch.compile(part.forward, **options)
    return model


def _parts(model: nn.Module) -> list[nn.Module]:
    parts: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            parts.extend(c for c in child.children() if _has_parameters(c))
        elif _has_parameters(child):
            parts.append(child)
    return parts


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
