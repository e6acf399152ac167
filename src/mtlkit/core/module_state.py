"""Saving and restoring a module's normalisation statistics around extra forward passes (F-MTL's
perturbed passes, TAG's lookahead), so that only the ordinary training pass updates them."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def normalization_buffers(model: nn.Module | None) -> list[tuple[Tensor, Tensor]]:
    """Copies of every normalisation layer's running statistics, to put back with
    :func:`restore_buffers`."""
    if model is None:
        return []
    out = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for buf in module.buffers(recurse=False):
                out.append((buf, buf.detach().clone()))
    return out


def restore_buffers(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, value in saved:
            buf.copy_(value)
