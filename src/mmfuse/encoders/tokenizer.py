"""The word-level question tokenizer of :class:`~mmfuse.encoders.TransformerTextEncoder`.

``"What's red?"`` -> ``<cls> what ' s red ?``; ids ``<pad>`` = 0, ``<unk>`` = 1, ``<cls>`` = 2, then
the words :meth:`WordTokenizer.fit` saw, most frequent first. It travels with a checkpoint in
``vocab.json`` (:func:`mmfuse.data.save_vocab`) as :meth:`WordTokenizer.to_dict`.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["CLS", "PAD", "SPECIAL_TOKENS", "UNK", "WordTokenizer", "decoder_rows"]

logger = logging.getLogger(__name__)

PAD, UNK, CLS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<unk>", "<cls>")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")  # runs of word characters, or one punctuation mark each


def decoder_rows(texts: Sequence[str], tokens: Callable[[str], Iterable[int]], *, bos: int, eos: int, pad: int,
                 max_length: int) -> Tensor:
    """``(N, L)`` int64 rows of a text decoder: ``bos``, ``tokens(text)``, ``eos``, then ``pad``; L <= ``max_length``.

    Raises ``ValueError`` naming the text when one does not fit (a truncated text would teach the decoder to
    stop early)."""
    rows = []
    for text in texts:
        row = [bos, *tokens(text), eos]
        if len(row) > max_length:
            raise ValueError(f"text {text!r} has {len(row)} tokens with <bos>/<eos>, more than max_length="
                             f"{max_length}; raise the model's max_length")
        rows.append(row)
    ids = np.full((len(rows), max(map(len, rows), default=2)), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return torch.from_numpy(ids)


class WordTokenizer:
    """Lower-cased word / punctuation tokenizer with ``<pad>`` = 0, ``<unk>`` = 1, ``<cls>`` = 2.

    ``"What's red?"`` -> ``["what", "'", "s", "red", "?"]``. Words not seen by :meth:`fit` map to ``<unk>``.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        vocab = list(vocab)
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with the special tokens {SPECIAL_TOKENS}, got {vocab[:3]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate tokens")
        self._vocab = vocab
        self._ids = {token: i for i, token in enumerate(vocab)}

    @classmethod
    def fit(cls, texts: Iterable[str], *, min_freq: int = 1) -> WordTokenizer:
        """Vocabulary of the words seen at least ``min_freq`` times, most frequent first (ties A-Z)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(token for text in texts for token in cls.tokenize(text))
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *words])  # the regex never yields "<pad>" etc. as one token

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _TOKEN_RE.findall(text.lower())

    def encode(self, texts: Sequence[str], *, max_length: int = 32) -> tuple[Tensor, Tensor]:
        """Token ids ``(N, L)`` (LongTensor) and mask ``(N, L)`` (bool, True = real token).

        Each row is ``<cls>`` then the text's tokens, right-padded with ``<pad>``; ``L`` is the longest
        row of this call, at most ``max_length``. Longer texts are truncated, with one warning per call.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for <cls>), got {max_length}")
        ids_of = self._ids
        rows = [[CLS, *[ids_of.get(t, UNK) for t in self.tokenize(text)]] for text in texts]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))  # (N,)
        truncated = int((lengths > max_length).sum())
        if truncated:
            logger.warning(
                "%d of %d texts are longer than max_length=%d tokens (with <cls>) and were truncated",
                truncated, len(rows), max_length,
            )
            rows = [row[:max_length] for row in rows]
            np.minimum(lengths, max_length, out=lengths)
        length = int(lengths.max(initial=1))
        mask = np.arange(length) < lengths[:, None]  # (N, L), rows are left-aligned
        ids = np.full((len(rows), length), PAD, dtype=np.int64)
        ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def decode(self, ids: Iterable[int]) -> str:
        """Space-joined tokens of one encoded row, without ``<pad>`` and ``<cls>``."""
        return " ".join(self._vocab[i] for i in ids if i not in (PAD, CLS))

    def __len__(self) -> int:
        return len(self._vocab)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "word", "vocab": list(self._vocab)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        if d.get("type") != "word":
            raise ValueError(f"not a WordTokenizer dict (type={d.get('type')!r})")
        vocab = d.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise ValueError(f"a WordTokenizer's 'vocab' must be a list of strings, got {type(vocab).__name__}")
        return cls(vocab)
