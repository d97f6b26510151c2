"""Parquet splits: ``train.parquet`` / ``test.parquet`` / ``val.parquet`` in a dataset directory.

Columns:

- ``question`` (string);
- ``answer`` (string), or ``answers`` (a list of strings, e.g. the ten human answers of VQA v2): training
  uses the most common one (ties: the first given), evaluation reports the VQA accuracy
  ``min(#answers matching the prediction / 3, 1)`` besides the plain accuracy against that answer;
- ``image``: the encoded image as bytes, a path relative to the directory, or a struct with ``bytes``
  and ``path`` fields (what Hugging Face ``datasets`` writes for an ``Image`` column);
- optionally ``answer_type`` (string). Other columns are ignored.

The file is read with pyarrow one record batch at a time, and only those columns, so a large file is
never held as a whole table. Identical images (the same bytes, or the same file) are decoded once.
Errors are :class:`~mmfuse.data.images.DataError` naming the file and the row (0-based, as pandas
shows it). ``pyarrow`` is an optional dependency (``pip install 'mmfuse[parquet]'``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .images import DataError, decode_image_bytes, load_image
from .jsonl import _resolve_image
from .split import VQASplit
from .storage import ImageStorage, stored_images

__all__ = ["load_parquet_split", "parquet_file"]

_BATCH_ROWS = 256


def parquet_file(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.parquet"


def _import_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("Parquet splits need the 'pyarrow' package: pip install 'mmfuse[parquet]'") from e
    return pq


def load_parquet_split(root: str | Path, split: str, *, image_size: int = 64, progress: bool | None = None,
                       require_answers: bool = True, resize: str = "squash",
                       storage: ImageStorage | str = "auto") -> VQASplit:
    """Load ``root/<split>.parquet`` into a :class:`VQASplit` (see the module docstring), its images in
    memory or on disk as ``storage`` says; with ``require_answers=False`` the answer column may be missing
    or null (an empty answer), for prediction."""
    pq = _import_pyarrow()
    root = Path(root)
    path = parquet_file(root, split)
    base = root.resolve()
    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot read as Parquet ({e})", path=path) from e
    names = set(file.schema_arrow.names)
    answer_column = "answer" if "answer" in names or "answers" not in names else "answers"
    unlabelled = not require_answers and answer_column not in names
    for column in ("question", *(() if unlabelled else (answer_column,)), "image"):
        if column not in names:
            expected = "'answer' or 'answers'" if column == answer_column else repr(column)
            raise DataError(f"{path}: no column {expected} (columns: {sorted(names)})", path=path)
    columns = ["question", "image", *(() if unlabelled else (answer_column,)),
               *(("answer_type",) if "answer_type" in names else ())]

    questions: list[str] = []
    answers: list[str] = []
    answer_lists: list[list[str]] | None = [] if answer_column == "answers" and not unlabelled else None
    answer_types: list[str] | None = [] if "answer_type" in names else None
    image_index: list[int] = []
    rows_of: dict[Any, int] = {}  # image key (bytes digest or file) -> image row
    first_rows: list[int] = []  # image row -> the file row where it first appears
    image_paths: list[str] = []
    row = 0
    bar = tqdm(total=file.metadata.num_rows, desc=f"{base.name}/{split}", unit="row",
               disable=None if progress is None else not progress, leave=False)
    with bar:
        for batch in file.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                where = f"{path} row {row}"
                question, answer = record["question"], record.get(answer_column)
                if not isinstance(question, str):
                    raise DataError(f"{where}: 'question' must be a string, got {type(question).__name__}", path=path)
                if answer is None and not require_answers:
                    answer = ""
                    if answer_lists is not None:
                        answer_lists.append([])
                elif answer_lists is not None:
                    if not isinstance(answer, list) or not answer or not all(isinstance(a, str) and a for a in answer):
                        raise DataError(f"{where}: 'answers' must be a non-empty list of non-empty strings, got "
                                        f"{answer!r}", path=path)
                    answer_lists.append(answer)
                    answer = Counter(answer).most_common(1)[0][0]  # ties: the first given
                elif not isinstance(answer, str) or not answer:
                    raise DataError(f"{where}: 'answer' must be a non-empty string, got {answer!r}", path=path)
                if answer_types is not None:
                    answer_types.append(str(record["answer_type"]))
                key, _ = _image(where, path, record["image"], base, image_size, resize)
                if key not in rows_of:
                    rows_of[key] = len(first_rows)
                    first_rows.append(row)
                    image_paths.append(str(key) if isinstance(key, Path) else f"{path.name}#row{row}")
                image_index.append(rows_of[key])
                questions.append(question)
                answers.append(answer)
                row += 1
            bar.update(batch.num_rows)
    if not questions:
        raise DataError(f"{path}: no examples", path=path)

    def fill(out: Any) -> None:
        """A second pass over the image column, decoding each image where it first appears."""
        targets = dict(zip(first_rows, range(len(first_rows)), strict=True))
        bar = tqdm(total=len(first_rows), desc=f"{base.name}/{split} images", unit="img",
                   disable=None if progress is None else not progress, leave=False)
        with bar:
            row = 0
            for batch in file.iter_batches(batch_size=_BATCH_ROWS, columns=["image"]):
                for cell in batch.column(0).to_pylist():
                    if row in targets:
                        _, load = _image(f"{path} row {row}", path, cell, base, image_size, resize)
                        out[targets[row]] = load()
                        bar.update()
                    row += 1

    sources = [path.resolve(), *(Path(p) for p in image_paths if not p.startswith(f"{path.name}#row"))]
    images = stored_images(len(first_rows), image_size, sources, fill, resize=resize, storage=storage)
    return VQASplit(images=images, image_index=torch.tensor(image_index, dtype=torch.long),
                    questions=questions, answers=answers, answer_types=answer_types, image_paths=image_paths,
                    name=f"{base.name}/{split}", answer_lists=answer_lists, resize=resize)


def _image(where: str, path: Path, cell: Any, base: Path, size: int, resize: str) -> tuple[Any, Any]:
    """(a key that is equal for identical images, a function decoding the image)."""
    if isinstance(cell, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, bytes | bytearray):
        data = bytes(cell)
        decode = lambda: decode_image_bytes(data, size, name=where, resize=resize)  # noqa: E731
        return hashlib.sha256(data).digest(), lambda: _wrap(where, path, decode)
    if isinstance(cell, str):
        file = _resolve_image(where, path, cell, base)
        return file, lambda: _wrap(where, path, lambda: load_image(file, size, resize=resize))
    raise DataError(f"{where}: 'image' must be bytes, a relative path or a {{bytes, path}} struct, got "
                    f"{type(cell).__name__}", path=path)


def _wrap(where: str, path: Path, decode: Any) -> Tensor:
    try:
        return decode()
    except DataError as e:
        message = str(e)
        raise DataError(message if message.startswith(where) else f"{where}: {message}", path=path) from e
