"""User datasets: a directory with ``train.jsonl``, ``test.jsonl`` and optionally ``val.jsonl``.

One JSON object a line (blank lines are skipped)::

    {"image": "images/0001.png", "question": "what color is the shape?", "answer": "blue"}

plus an optional ``"answer_type"`` and an optional ``"kind"`` (a question family such as Sort-of-CLEVR's
"relational" / "non-relational"; each given on every line of a split or on none); other keys are ignored.
``image`` is a path relative to the dataset directory; an absolute path, or one whose ``..`` parts climb
out of the directory, is rejected. The check is on the path as written: a symbolic link inside the
directory may point elsewhere (the dataset's owner put it there). Questions naming the same file share
one decoded image. Every error is a :class:`DataError` naming the file and, where there is one, the line.

Precomputed features: a line may give ``"image_features": "feats/0001.safetensors"`` (a tensor named
``features``, (N, D) or (D,); see :mod:`mmfuse.data.features`) instead of ``"image"``, on every line of
a split; the split then holds image tokens and the model skips its vision encoder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from .features import load_feature_files
from .images import DataError
from .split import VQASplit
from .storage import ImageStorage, decoded_images

__all__ = ["SPLIT_NAMES", "load_jsonl_split", "split_file"]

SPLIT_NAMES = ("train", "val", "test")


_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def split_file(root: str | Path, split: str) -> Path:
    """``root/<split>.jsonl``; training uses ``train`` / ``val`` / ``test``, prediction any plain name."""
    if not _SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split must be one of {SPLIT_NAMES} or another plain name (letters, digits, _ . -), "
                         f"got {split!r}")
    return Path(root) / f"{split}.jsonl"


@dataclass
class _Example:
    line: int
    image: Path  # resolved
    question: str
    answer: str
    answer_type: str | None
    kind: str | None = None
    features: bool = False  # ``image`` is an image_features file


def load_jsonl_split(
    root: str | Path, split: str, *, image_size: int = 64, progress: bool | None = None,
    require_answers: bool = True, resize: str = "squash", storage: ImageStorage | str = "auto",
) -> VQASplit:
    """Load ``root/<split>.jsonl`` and decode the images it names into a :class:`VQASplit`, in memory or on
    disk as ``storage`` says (:mod:`mmfuse.data.storage`).

    ``require_answers=False`` reads unlabelled lines too (no ``answer``: an empty answer), for prediction."""
    root = Path(root)
    path = split_file(root, split)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (a dataset directory holds train.jsonl, "
                        "test.jsonl and optionally val.jsonl)", path=path)
    base = root.resolve()
    examples = [_parse_line(path, n, line, base, require_answers) for n, line in _numbered_lines(path)]
    if not examples:
        raise DataError(f"{path}: no examples", path=path)
    _check_answer_types(path, examples)
    _check_same_kind(path, examples)

    first_line: dict[Path, int] = {}  # image file -> first line naming it; its dict order = image rows
    for ex in examples:
        first_line.setdefault(ex.image, ex.line)
    row_of = {image: row for row, image in enumerate(first_line)}
    try:
        images = (load_feature_files(list(first_line), desc=f"{base.name}/{split}", progress=progress)
                  if examples[0].features else
                  decoded_images(list(first_line), image_size, desc=f"{base.name}/{split}", progress=progress,
                                 resize=resize, storage=storage))
    except DataError as e:
        line = first_line.get(Path(e.path)) if e.path else None
        if line is None:
            raise
        raise DataError(f"{path} line {line}: {e}", path=path) from e

    has_types = examples[0].answer_type is not None
    return VQASplit(
        images=images,
        image_index=torch.tensor([row_of[ex.image] for ex in examples], dtype=torch.long),
        questions=[ex.question for ex in examples],
        answers=[ex.answer for ex in examples],
        answer_types=[str(ex.answer_type) for ex in examples] if has_types else None,
        kinds=[str(ex.kind) for ex in examples] if examples[0].kind is not None else None,
        image_paths=[str(p) for p in first_line],
        name=f"{base.name}/{split}",
        resize=resize,
    )


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of ``path`` with their 1-based numbers; a line that is not UTF-8 is named."""
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} line {n}: not UTF-8 text (byte {e.start + 1} of the line: "
                                    f"{raw[e.start:e.start + 1]!r})", path=path) from e
                if line.strip():
                    yield n, line
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})", path=path) from e


def _parse_line(path: Path, n: int, line: str, base: Path, require_answers: bool = True) -> _Example:
    where = f"{path} line {n}"
    try:
        obj: Any = json.loads(line)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:  # ValueError: an integer of 5,000 digits
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise DataError(f"{where}: invalid JSON: {reason}", path=path) from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}", path=path)
    features = "image" not in obj and "image_features" in obj
    for key in ("image_features" if features else "image", "question", *(("answer",) if require_answers else ())):
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r}", path=path)
    for key in ("image", "image_features", "question", "answer", "answer_type", "kind"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}", path=path)
    if require_answers and not obj["answer"]:
        raise DataError(f"{where}: 'answer' is empty", path=path)
    image = _resolve_image(where, path, obj["image_features" if features else "image"], base)
    return _Example(n, image, obj["question"], obj.get("answer", ""), obj.get("answer_type"), obj.get("kind"),
                    features)


def _resolve_image(where: str, path: Path, image: str, base: Path) -> Path:
    if not image:
        raise DataError(f"{where}: 'image' is empty", path=path)
    if "\0" in image or len(image) > 4096:
        raise DataError(f"{where}: image path {image[:60]!r}... is not a file path (NUL byte, or over 4096 "
                        "characters)", path=path)
    if PurePosixPath(image).is_absolute() or PureWindowsPath(image).anchor:  # "/x", "C:\\x", "C:x"
        raise DataError(f"{where}: image path {image!r} must be relative to the dataset directory", path=path)
    normal = os.path.normpath(image)
    if normal == ".." or normal.startswith(".." + os.sep):
        raise DataError(f"{where}: image path {image!r} leads outside the dataset directory", path=path)
    try:
        file = (base / normal).resolve()
        found = file.is_file()
    except OSError as e:  # a name too long for the file system
        raise DataError(f"{where}: image path {image[:60]!r}: {e.strerror}", path=path) from e
    if not found:
        raise DataError(f"{where}: image file {image!r} not found ({file})", path=path)
    # A symbolic link is followed only as far as the dataset directory: one pointing outside is refused.
    if not file.is_relative_to(base.resolve()):
        raise DataError(f"{where}: image path {image!r} is a link to {file}, outside the dataset directory",
                        path=path)
    return file


def _check_same_kind(path: Path, examples: list[_Example]) -> None:
    kinds = [ex.features for ex in examples]
    if any(kinds) and not all(kinds):
        first = examples[kinds.index(not kinds[0])].line
        raise DataError(f"{path} line {first}: a split gives 'image' on every line or 'image_features' on every "
                        f"line, not both (line {examples[0].line} differs)", path=path)


def _check_answer_types(path: Path, examples: list[_Example]) -> None:
    for key in ("answer_type", "kind"):
        with_type = [getattr(ex, key) is not None for ex in examples]
        if any(with_type) and not all(with_type):
            first = examples[with_type.index(True)].line
            missing = examples[with_type.index(False)].line
            raise DataError(f"{path} line {missing}: no {key!r}, but line {first} has one; give it on "
                            "every line or on none", path=path)
