"""Hugging Face ``transformers`` encoders as the shared trunk of a multi-task model.

:class:`TransformerMultiTask` puts one head per task on any ``transformers`` encoder (BERT,
RoBERTa, MiniLM, DeBERTa, ...), given as a model object or as a local folder in the
``save_pretrained`` layout. Folders are read with ``local_files_only=True``: nothing is ever
downloaded, so a model that ships inside a package (the ``text`` extra's all-MiniLM-L6-v2,
:func:`mtlkit.models.minilm.minilm_path`) or that you saved yourself works offline. The model
follows mtlkit's model contract, so every method, the Trainer, merging and the Lightning module take
it as they take mtlkit's own architectures.

Needs the ``transformers`` extra (``pip install "mtlkit[transformers]"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

from mtlkit.core.contract import MultiTaskOutput
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, ShapeMismatchError
from mtlkit.models.base import MultiTaskModule, mlp, resolve_out_features

POOLING = ("mean", "cls")


def load_encoder(source: str | Path | PreTrainedModel) -> PreTrainedModel:
    """``source`` itself, or the encoder saved in the folder ``source`` (offline only)."""
    if isinstance(source, PreTrainedModel):
        return source
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder} is not a saved transformers model (no config.json); mtlkit loads encoders from local "
            "folders only and never downloads."
        )
    return AutoModel.from_pretrained(str(folder), local_files_only=True)


class TransformerMultiTask(MultiTaskModule):
    """A ``transformers`` encoder shared by every task, with an MLP head per task.

    Args:
        encoder: a ``transformers`` model, or the local folder of one.
        tasks: the task set (or task names).
        out_features: outputs per task, or a map.
        tower_dims: hidden widths of each head (none: a linear head).
        pooling: ``"mean"`` (over the attention mask, as sentence-transformers do) or ``"cls"``
            (the first token's hidden state).
        freeze: keep the encoder's weights fixed (only the heads train).
        dropout: dropout on the pooled representation.

    Inputs: a mapping with ``input_ids`` (and optionally ``attention_mask``, ``token_type_ids``), as
    a tokenizer returns it, or a tensor of token ids (no padding). The representation is the
    pooled sentence vector (B, hidden).
    """

    def __init__(
        self,
        encoder: str | Path | PreTrainedModel,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        out_features: int | Mapping[str, int] = 1,
        tower_dims: Sequence[int] = (),
        pooling: str = "mean",
        freeze: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        if pooling not in POOLING:
            raise ConfigError(f"pooling must be one of {POOLING}, got {pooling!r}.")
        self.encoder = load_encoder(encoder)
        self.pooling = pooling
        if freeze:
            self.encoder.requires_grad_(False)
        hidden = int(self.encoder.config.hidden_size)
        outs = resolve_out_features(self.task_names, out_features)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict(
            {t: mlp(hidden, list(tower_dims), out_features=outs[t]) for t in self.task_names}
        )

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.encoder]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.heads[task]]

    def encode(self, x: Mapping[str, Tensor] | Tensor) -> Tensor:
        """The pooled sentence vectors (B, hidden)."""
        inputs = dict(x) if isinstance(x, Mapping) else {"input_ids": x}
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ShapeMismatchError(
                f"TransformerMultiTask expects input_ids of shape (batch, tokens), got {got}."
            )
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
            inputs["attention_mask"] = mask
        hidden = self.encoder(**inputs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask[:, :, None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)

    def forward_tasks(self, x: Any, tasks: list[str]) -> MultiTaskOutput:
        z = self.encode(x)
        h = self.dropout(z)
        return MultiTaskOutput({t: self.heads[t](h) for t in tasks}, z)
