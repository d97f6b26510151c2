"""Where a split's decoded images live: in memory, or in a file on disk for datasets larger than memory.

Decoded, a dataset is much larger than its files (100,000 images at 224 px are 15 GB of uint8). Above a
size threshold, or when asked, the images are decoded once into ``<cache_dir>/images/<key>.npy`` (a
progress bar while it builds) and later runs read that file; training gathers each batch's rows from it
with ``pread`` (:mod:`mmfuse.data.disk`), so memory stays flat however large the file.

The key covers what the decoded pixels depend on: every file's path, size and modification time, the
image size, the ``resize`` mode and the decoding version. Settings (environment, so every command honours them):

- ``MMFUSE_IMAGE_STORAGE``: ``auto`` (default: disk above the threshold), ``memory`` or ``disk``;
- ``MMFUSE_IMAGE_MEMORY_GB``: the threshold of ``auto`` in GiB of decoded images (default 2);
- ``MMFUSE_CACHE``: the cache directory (default ``~/.cache/mmfuse``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .disk import read_array, write_array
from .easy_vqa import default_cache_dir
from .images import DataError, load_images

__all__ = ["STORAGES", "decoded_images", "image_storage", "stored_images"]

logger = logging.getLogger(__name__)

STORAGES = ("auto", "memory", "disk")
_FORMAT = "1"
_GIB = 2**30


def image_storage(num_bytes: int, storage: str | None = None) -> str:
    """``"memory"`` or ``"disk"`` for ``num_bytes`` of decoded images under ``storage`` (default: the environment)."""
    storage = storage or os.environ.get("MMFUSE_IMAGE_STORAGE", "auto")
    if storage not in STORAGES:
        raise ValueError(f"image storage must be one of {STORAGES}, got {storage!r} (MMFUSE_IMAGE_STORAGE)")
    if storage != "auto":
        return storage
    limit = float(os.environ.get("MMFUSE_IMAGE_MEMORY_GB", "2"))
    return "disk" if num_bytes > limit * _GIB else "memory"


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
                  storage: str | None = None, cache_dir: str | Path | None = None, resize: str = "squash") -> Tensor:
    """(num_images, 3, size, size) uint8 images that ``fill(out)`` decodes (``out[i] = image``), in memory or
    from / into the disk cache; ``sources`` are the files the pixels come from (the cache key)."""
    shape = (num_images, 3, size, size)
    if image_storage(int(np.prod(shape)), storage) == "memory":
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
                   storage: str | None = None, cache_dir: str | Path | None = None, resize: str = "squash") -> Tensor:
    """``load_images(paths, size)``, in memory or from / into the disk cache (see the module docstring)."""
    return stored_images(len(paths), size, paths, lambda out: load_images(
        paths, size, desc=desc, progress=progress, out=out, resize=resize), storage=storage, cache_dir=cache_dir,
        resize=resize)
