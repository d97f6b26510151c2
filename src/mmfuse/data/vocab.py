"""Answer vocabulary, and the ``vocab.json`` file that holds it and the question tokenizer in a checkpoint.

The tokenizer itself is :class:`mmfuse.encoders.tokenizer.WordTokenizer` (re-exported here).

``vocab.json`` (JSON only, nothing to unpickle)::

    {"format": 1,
     "tokenizer": {...},          # the text encoder's tokenizer, e.g. WordTokenizer.to_dict()
     "answers": ["black", ...]}   # AnswerVocab.names: class i of the answer head is answers[i]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# The tokenizer belongs to the text encoder; it is re-exported here, where it used to live.
from mmfuse.encoders.tokenizer import CLS, PAD, SPECIAL_TOKENS, UNK, WordTokenizer
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

_VOCAB_FORMAT = 1


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
