"""Where a split's decoded images live: in memory, or in a file on disk for datasets larger than memory.

Decoded, a dataset is much larger than its files (100,000 images at 224 px are 15 GB of uint8). Above a
size threshold, or when asked, the images are decoded once into ``<cache_dir>/images/<key>.npy`` (a
progress bar while it builds) and later runs read that file; training gathers each batch's rows from it
with ``pread`` (:mod:`mmfuse.data.disk`), so memory stays flat however large the file.

The key covers what the decoded pixels depend on: every file's path, size and modification time, the
image size, the ``resize`` mode and the decoding version. The choice is an :class:`ImageStorage` (the
command line's ``--image-storage`` and ``--image-memory-gb``); the cache directory is ``$MMFUSE_CACHE``
(default ``~/.cache/mmfuse``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .disk import read_array, write_array
from .easy_vqa import default_cache_dir
from .images import DataError, load_images

__all__ = ["STORAGES", "ImageStorage", "decoded_images", "stored_images"]

logger = logging.getLogger(__name__)

STORAGES = ("auto", "memory", "disk")
_FORMAT = "1"
_GIB = 2**30


@dataclass(frozen=True)
class ImageStorage:
    """Where decoded images live: ``mode`` ``"memory"``, ``"disk"`` (a memory-mapped ``.npy`` in the cache
    directory) or ``"auto"``: disk when a split's decoded images exceed ``memory_gb`` GiB."""

    mode: str = "auto"
    memory_gb: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in STORAGES:
            raise ValueError(f"image_storage must be one of {', '.join(STORAGES)}, got {self.mode!r}")
        gb = self.memory_gb
        if isinstance(gb, bool) or not isinstance(gb, int | float) or not (math.isfinite(gb) and gb >= 0):
            raise ValueError(f"image_memory_gb must be a finite number of GiB >= 0, got {gb!r}")

    @classmethod
    def of(cls, storage: ImageStorage | str) -> ImageStorage:
        """``storage`` itself, or ``ImageStorage(storage)`` for a mode given by name."""
        return storage if isinstance(storage, ImageStorage) else cls(storage)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ImageStorage:
        """From a run's training settings (``run.json``: ``image_storage``, ``image_memory_gb``); the defaults
        where they are absent (a run written before they existed)."""
        default = cls()
        return cls(settings.get("image_storage", default.mode), settings.get("image_memory_gb", default.memory_gb))

    def where(self, num_bytes: int) -> str:
        """``"memory"`` or ``"disk"`` for a split of ``num_bytes`` decoded bytes."""
        if self.mode != "auto":
            return self.mode
        return "disk" if num_bytes > self.memory_gb * _GIB else "memory"


def _key(paths: Sequence[Path], size: int, resize: str) -> str:
    h = hashlib.sha256(f"mmfuse-images:{_FORMAT}:{size}:{resize};".encode())
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise DataError(f"{path}: image file not found ({e})", path=path) from e
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


def stored_images(num_images: int, size: int, sources: Sequence[Path], fill: Callable[[Any], None], *,
                  storage: ImageStorage | str = "auto", cache_dir: str | Path | None = None,
                  resize: str = "squash") -> Tensor:
    """(num_images, 3, size, size) uint8 images that ``fill(out)`` decodes (``out[i] = image``), in memory or
    from / into the disk cache as ``storage`` says; ``sources`` are the files the pixels come from (the key)."""
    shape = (num_images, 3, size, size)
    if ImageStorage.of(storage).where(int(np.prod(shape))) == "memory":
        out = torch.empty(shape, dtype=torch.uint8)
        fill(out)
        return out
    file = Path(cache_dir or default_cache_dir()) / "images" / f"{_key(sources, size, resize)}-{size}px.npy"
    images = read_array(file, shape, np.uint8)
    if images is not None:
        logger.info("image cache: reused %d images from %s", num_images, file)
        return images
    images = write_array(file, shape, np.uint8, fill)
    logger.info("image cache: decoded %d images into %s", num_images, file)
    return images


def decoded_images(paths: Sequence[Path], size: int, *, desc: str = "images", progress: bool | None = None,
                   storage: ImageStorage | str = "auto", cache_dir: str | Path | None = None,
                   resize: str = "squash") -> Tensor:
    """``load_images(paths, size)``, in memory or from / into the disk cache (see the module docstring)."""
    return stored_images(len(paths), size, paths, lambda out: load_images(
        paths, size, desc=desc, progress=progress, out=out, resize=resize), storage=storage, cache_dir=cache_dir,
        resize=resize)
