"""BERT's uncased WordPiece tokenizer (basic tokenization, then greedy longest-match word pieces),
read from a ``vocab.txt``; our own implementation, so no tokenizer library is needed."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import torch
from torch import Tensor

from mtlkit.errors import ConfigError


def _is_punctuation(ch: str) -> bool:
    code = ord(ch)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True  # ASCII non-letters count as punctuation in BERT, e.g. "$" and "^"
    return unicodedata.category(ch).startswith("P")


def _is_cjk(code: int) -> bool:
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2B73F
        or 0x2B740 <= code <= 0x2B81F
        or 0x2B820 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x2F800 <= code <= 0x2FA1F
    )


class WordPieceTokenizer:
    """``tokenize(text)`` gives word pieces; ``encode(texts, max_length)`` gives padded id and mask
    tensors with ``[CLS]`` and ``[SEP]`` around each text.

    Basic tokenization as BERT's uncased models: drop control characters, put spaces around CJK
    characters, lower-case and strip accents (NFD, combining marks removed), split on whitespace and
    on every punctuation character. Then each word becomes its longest matching vocabulary prefix
    and ``##``-prefixed continuations; a word with no segmentation (or over 100 characters) is
    ``[UNK]``.
    """

    def __init__(self, vocab_path: str | Path, lowercase: bool = True, max_word: int = 100) -> None:
        words = Path(vocab_path).read_text(encoding="utf-8").splitlines()
        self.vocab = {w: i for i, w in enumerate(words)}
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ConfigError(f"{vocab_path} lacks the special token {special}.")
        self.lowercase, self.max_word = lowercase, max_word

    def basic(self, text: str) -> list[str]:
        out = []
        for ch in text:
            code = ord(ch)
            if (
                code == 0
                or code == 0xFFFD
                or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r")
            ):
                continue
            out.append(f" {ch} " if _is_cjk(code) else (" " if ch.isspace() else ch))
        words = []
        for word in "".join(out).split():
            if self.lowercase:
                word = "".join(
                    c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn"
                )
            piece = ""
            for ch in word:
                if _is_punctuation(ch):
                    if piece:
                        words.append(piece)
                    words.append(ch)
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def wordpiece(self, word: str) -> list[str]:
        if len(word) > self.max_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                candidate = ("##" if start else "") + word[start:end]
                if candidate in self.vocab:
                    found = candidate
                    break
                end -= 1
            if found is None:
                return ["[UNK]"]
            pieces.append(found)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for w in self.basic(text) for p in self.wordpiece(w)]

    def encode(self, texts: list[str], max_length: int = 256) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, both (N, L) int64, padded to the longest text (at most
        ``max_length`` ids, ``[CLS]`` and ``[SEP]`` included)."""
        if isinstance(texts, str):
            raise ConfigError("encode() takes a list of texts; wrap a single text as [text].")
        if not texts:
            raise ConfigError("encode() got no texts.")
        if max_length < 2:
            raise ConfigError(f"max_length must leave room for [CLS] and [SEP], got {max_length}.")
        rows = []
        for text in texts:
            pieces = [self.vocab[p] for p in self.tokenize(text)][: max_length - 2]
            rows.append([self.vocab["[CLS]"], *pieces, self.vocab["[SEP]"]])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.vocab["[PAD]"], dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask
