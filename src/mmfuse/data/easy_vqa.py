"""easy-VQA (the ``easy-vqa`` package): 38,575 train / 9,673 test questions over 4,000 / 1,000 64x64 images.

The PNGs are decoded once per (split, image size) and cached as one safetensors file of uint8 images in
``cache_dir`` (default ``$MMFUSE_CACHE``, else ``~/.cache/mmfuse``). The file name carries a fingerprint
of the installed package (its version, the number and total size of the image files), so an upgraded or
modified package gets a fresh cache; a cache file that cannot be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import easy_vqa
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor

from mmfuse.io import atomic_path

from .images import DataError, load_images
from .split import VQASplit

if TYPE_CHECKING:
    from .storage import ImageStorage

__all__ = ["answer_type", "default_cache_dir", "load_easy_vqa"]

logger = logging.getLogger(__name__)

_SHAPES = frozenset({"circle", "rectangle", "triangle"})
_CACHE_FORMAT = "1"


def answer_type(answer: str) -> str:
    """easy-VQA's question type, read off its answer: "yes/no", "shape" or "color"."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in _SHAPES else "color"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMFUSE_CACHE") or Path.home() / ".cache" / "mmfuse")


def load_easy_vqa(
    split: Literal["train", "test"],
    *,
    image_size: int = 64,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    resize: str = "squash",
    storage: ImageStorage | str = "auto",
) -> VQASplit:
    """Load one easy-VQA split, questions in the package's order, images decoded once and cached.

    The images are square, so every ``resize`` mode gives the same pixels; the split records the mode the
    model asked for. ``storage`` that says disk keeps the images in a memory-mapped ``.npy``
    (:mod:`mmfuse.data.storage`) instead of memory."""
    from .storage import ImageStorage, decoded_images  # here: storage takes default_cache_dir from this module

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths_by_id = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths_by_id = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA has the splits 'train' and 'test', not {split!r}")

    ids = sorted(paths_by_id)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    missing = sorted(set(image_ids) - row_of.keys())
    if missing:
        raise DataError(f"easy-VQA {split}: questions refer to images {missing[:5]} that are not installed")
    paths = [paths_by_id[i] for i in ids]

    desc = f"easy-VQA {split}"
    if ImageStorage.of(storage).where(len(paths) * 3 * image_size**2) == "disk":
        images = decoded_images([Path(p) for p in paths], image_size, desc=desc, progress=progress,
                                storage="disk", cache_dir=cache_dir, resize=resize)
    else:
        cache_file = Path(cache_dir or default_cache_dir()) / _cache_name(split, image_size, paths, resize)
        images = _read_cache(cache_file, len(paths), image_size)
        if images is None:
            images = load_images(paths, image_size, desc=desc, progress=progress, resize=resize)
            _write_cache(cache_file, images)

    return VQASplit(
        images=images,
        image_index=torch.tensor([row_of[i] for i in image_ids], dtype=torch.long),
        questions=list(questions),
        answers=list(answers),
        answer_types=[answer_type(a) for a in answers],
        image_paths=paths,
        name=f"easy-vqa/{split}",
        resize=resize,
    )


def _cache_name(split: str, image_size: int, paths: list[str], resize: str = "squash") -> str:
    version = importlib.metadata.version("easy-vqa")
    total_bytes = sum(os.path.getsize(p) for p in paths)
    fingerprint = f"{_CACHE_FORMAT}|{version}|{len(paths)}|{total_bytes}"
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    mode = "" if resize == "squash" else f"-{resize}"  # squash: the name caches had before the modes existed
    return f"easy-vqa-{split}-{image_size}px{mode}-{digest}.safetensors"


def _read_cache(path: Path, num_images: int, image_size: int) -> Tensor | None:
    if not path.is_file():
        return None
    try:
        images = load_safetensors(path.read_bytes())["images"]
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
        logger.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, e)
        return None
    expected = (num_images, 3, image_size, image_size)
    if images.dtype != torch.uint8 or tuple(images.shape) != expected:
        logger.warning("ignoring cache file %s: %s %s, expected uint8 %s; rebuilding it",
                       path, images.dtype, tuple(images.shape), expected)
        return None
    logger.info("loaded %d images from %s", num_images, path)
    return images


def _write_cache(path: Path, images: Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"images": images.contiguous()}, tmp)
    except (OSError, SafetensorError) as e:
        logger.warning("cannot write the image cache %s (%s); continuing without it", path, e)
        return
    logger.info("cached %d decoded images in %s", images.shape[0], path)
