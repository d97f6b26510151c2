"""Question tokenizer, answer vocabulary, and the ``vocab.json`` file that holds both in a checkpoint.

``vocab.json`` (JSON only, nothing to unpickle)::

    {"format": 1,
     "tokenizer": {...},          # the text encoder's tokenizer, e.g. WordTokenizer.to_dict()
     "answers": ["black", ...]}   # AnswerVocab.names: class i of the answer head is answers[i]
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmfuse.io import atomic_path

__all__ = [
    "CLS",
    "PAD",
    "SPECIAL_TOKENS",
    "UNK",
    "AnswerVocab",
    "WordTokenizer",
    "load_vocab",
    "save_vocab",
]

logger = logging.getLogger(__name__)

PAD, UNK, CLS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<unk>", "<cls>")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")  # runs of word characters, or one punctuation mark each
_VOCAB_FORMAT = 1


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


class AnswerVocab:
    """The answer classes: the distinct answers given, sorted, so class ids do not depend on data order.

    :meth:`index` returns -1 for an answer outside the vocabulary (a test answer training never saw):
    such an example can never be predicted right, and the evaluator counts it as wrong.
    """

    def __init__(self, answers: Iterable[str]) -> None:
        self._set_names(sorted(set(answers)))

    def _set_names(self, names: list[str]) -> None:
        if not names:
            raise ValueError("an answer vocabulary needs at least one answer")
        if len(set(names)) != len(names):
            raise ValueError("answer names must be unique")
        self._names = names
        self._index = {a: i for i, a in enumerate(names)}

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def index(self, answer: str) -> int:
        return self._index.get(answer, -1)

    def __contains__(self, answer: object) -> bool:
        return answer in self._index

    def __len__(self) -> int:
        return len(self._names)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self._names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnswerVocab:
        vocab = cls.__new__(cls)
        vocab._set_names(list(d["names"]))  # saved order is kept as is: it is the head's class order
        return vocab


def save_vocab(
    path: str | Path, tokenizer_dict: dict[str, Any], answers: Sequence[str] | AnswerVocab
) -> None:
    """Write ``vocab.json`` atomically."""
    path = Path(path)
    names = answers.names if isinstance(answers, AnswerVocab) else list(answers)
    text = json.dumps({"format": _VOCAB_FORMAT, "tokenizer": tokenizer_dict, "answers": names}, indent=1)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def load_vocab(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Read ``vocab.json``: ``(tokenizer_dict, answer_names)``, the arguments :func:`save_vocab` took."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read vocabulary ({e})") from e
    if not isinstance(d, dict) or d.get("format") != _VOCAB_FORMAT:
        raise ValueError(f"{path}: not an mmfuse vocab.json (format {_VOCAB_FORMAT})")
    tokenizer, answers = d.get("tokenizer"), d.get("answers")
    if not isinstance(tokenizer, dict):
        raise ValueError(f"{path}: 'tokenizer' must be a JSON object, got {type(tokenizer).__name__}")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: 'answers' must be a non-empty list of strings, got {type(answers).__name__}")
    return tokenizer, answers
