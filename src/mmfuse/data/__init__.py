"""Datasets held in memory as uint8 tensors, the question / answer vocabularies, and image-grouped batches.

``load_split("easy-vqa", "train")`` loads the built-in dataset; ``load_split("path/to/dir", "test")`` a
directory of JSONL or Parquet files (see :mod:`mmfuse.data.jsonl`,
:mod:`mmfuse.data.parquet`). Test answers the training split never saw are
not an error: :func:`encode_answers` maps them to -1 and the evaluator counts them as wrong.
"""

from __future__ import annotations

from pathlib import Path

from .batching import Batch, ImageGroupedBatches, encode_answers
from .easy_vqa import default_cache_dir, load_easy_vqa
from .images import DataError, load_image, load_images
from .jsonl import SPLIT_NAMES, load_jsonl_split, split_file
from .parquet import load_parquet_split, parquet_file
from .split import VQASplit, majority_answer_accuracy
from .storage import ImageStorage
from .vocab import AnswerVocab, WordTokenizer, load_vocab, save_vocab

__all__ = [
    "EASY_VQA",
    "AnswerVocab",
    "Batch",
    "DataError",
    "ImageGroupedBatches",
    "ImageStorage",
    "VQASplit",
    "WordTokenizer",
    "default_cache_dir",
    "encode_answers",
    "has_split",
    "load_easy_vqa",
    "load_image",
    "load_images",
    "load_jsonl_split",
    "load_parquet_split",
    "load_split",
    "load_vocab",
    "majority_answer_accuracy",
    "parquet_file",
    "save_vocab",
]

EASY_VQA = "easy-vqa"
_EASY_VQA_SPLITS = ("train", "test")


def has_split(data: str | Path, split: str) -> bool:
    """Whether ``data`` ("easy-vqa" or a dataset directory) has ``split``; e.g. to look for ``val``."""
    if str(data) == EASY_VQA:
        return split in _EASY_VQA_SPLITS
    return split in SPLIT_NAMES and (split_file(data, split).is_file() or parquet_file(data, split).is_file())


def load_split(
    data: str | Path, split: str, *, image_size: int = 64, progress: bool | None = None,
    require_answers: bool = True, resize: str = "squash", storage: ImageStorage | str = "auto",
) -> VQASplit:
    """Load ``split`` of ``data``: "easy-vqa" (train / test) or a directory of ``<split>.jsonl`` files (or
    ``<split>.parquet``, read when there is no ``.jsonl`` of that split). ``storage``: where the decoded
    images live (:class:`ImageStorage`, or its mode ``"auto"`` / ``"memory"`` / ``"disk"``)."""
    if str(data) == EASY_VQA:
        if split not in _EASY_VQA_SPLITS:
            raise DataError(f"easy-VQA has the splits {_EASY_VQA_SPLITS}, not {split!r}")
        return load_easy_vqa(split, image_size=image_size, progress=progress,  # type: ignore[arg-type]
                             resize=resize, storage=storage)
    if not Path(data).is_dir():
        raise DataError(f"data {str(data)!r} is neither {EASY_VQA!r} nor a dataset directory "
                        "(one holding train.jsonl and test.jsonl)")
    load = (load_parquet_split if not split_file(data, split).is_file() and parquet_file(data, split).is_file()
            else load_jsonl_split)
    return load(data, split, image_size=image_size, progress=progress, require_answers=require_answers,
                resize=resize, storage=storage)
