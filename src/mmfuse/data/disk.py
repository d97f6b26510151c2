"""Arrays on disk: ``.npy`` files written once, atomically, and mapped into memory on later reads.

A mapped array costs no memory up front: pages are read when a batch gathers its rows and the kernel
may drop them again, so a dataset larger than memory trains from its file. Files are opened
copy-on-write (``mmap_mode="c"``), so tensors over them are writable in memory and the file is never
changed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmfuse.io import atomic_path

__all__ = ["content_digest", "read_array", "write_array"]

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 256


def content_digest(x: Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes (hashed in chunks of rows: no copy of the whole)."""
    h = hashlib.sha256(f"{tuple(x.shape)}:{x.dtype};".encode())
    flat = x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)
    for start in range(0, flat.shape[0], _CHUNK_ROWS):
        h.update(flat[start : start + _CHUNK_ROWS].contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def read_array(path: Path, shape: tuple[int | None, ...], dtype: np.dtype | type) -> Tensor | None:
    """The mapped array in ``path`` as a tensor, or None when the file is missing or not of ``shape``/``dtype``
    (a None in ``shape`` matches any size)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, e)
        return None
    fits = len(array.shape) == len(shape) and all(e is None or e == a for a, e in zip(array.shape, shape, strict=True))
    if not fits or array.dtype != np.dtype(dtype):
        logger.warning("ignoring cache file %s: %s %s, expected %s %s; rebuilding it",
                       path, array.dtype, array.shape, np.dtype(dtype), tuple(shape))
        return None
    return torch.from_numpy(array)


def write_array(path: Path, shape: tuple[int, ...], dtype: np.dtype | type,
                fill: Callable[[np.ndarray], None]) -> Tensor:
    """Create ``path`` as a ``.npy`` of ``shape``, let ``fill(array)`` write its rows, and return it mapped.

    The file appears complete or not at all (written beside, then renamed); the rows never all sit in
    memory at once, whatever ``fill`` writes through the mapping is paged out as the kernel needs.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        fill(array)
        array.flush()
        del array
    mapped = read_array(path, shape, dtype)
    if mapped is None:
        raise OSError(f"{path}: the array just written cannot be read back")
    return mapped
