"""Arrays on disk: ``.npy`` files written once, atomically, then read back row by row.

What is written never all sits in memory: :func:`write_array` hands ``fill`` a writer that stores rows
with ``pwrite`` (the page cache holds them, not the process). Read back, the array is a tensor over a
copy-on-write memory map (:func:`read_array`; nothing is read up front, and the file is never changed)
that carries a :class:`DiskRows` as ``tensor.disk_rows``: the batching gathers a batch's rows through
it with ``pread``, so an epoch over a file larger than memory leaves the process's resident set flat
(pages touched through a map count towards it until the kernel takes them back; pages read with
``pread`` are the kernel's cache).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmfuse.io import atomic_path

__all__ = ["DiskRows", "RowWriter", "content_digest", "read_array", "write_array"]

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 256


def content_digest(x: Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes (hashed in chunks of rows: no copy of the whole)."""
    h = hashlib.sha256(f"{tuple(x.shape)}:{x.dtype};".encode())
    flat = x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)
    for start in range(0, flat.shape[0], _CHUNK_ROWS):
        h.update(flat[start : start + _CHUNK_ROWS].contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass(frozen=True)
class DiskRows:
    """Where the rows of a ``.npy`` file are: row ``i`` is ``row_shape`` ``dtype`` at ``offset + i * row_bytes``."""

    path: Path
    offset: int
    row_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * self.dtype.itemsize

    def gather(self, rows: Sequence[int] | np.ndarray, fd: int) -> np.ndarray:
        """Rows ``rows`` (in that order) read with ``pread`` from the open file ``fd`` -> (len(rows), *row_shape)."""
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        view = out.reshape(len(rows), -1).view(np.uint8)  # (n, row_bytes): each row a writable buffer
        size = self.row_bytes
        for i, row in enumerate(np.asarray(rows).tolist()):
            if os.preadv(fd, [view[i]], self.offset + row * size) != size:
                raise OSError(f"{self.path}: short read at row {row} (the file was truncated)")
        return out


class RowWriter:
    """``writer[i] = row`` / ``writer[a:b] = rows`` into a ``.npy`` being written (see :func:`write_array`)."""

    def __init__(self, fd: int, rows: DiskRows, num_rows: int) -> None:
        self._fd, self._rows, self._num_rows = fd, rows, num_rows

    def __setitem__(self, index: int | slice, value: Any) -> None:
        start = (index.start or 0) if isinstance(index, slice) else int(index)
        data = np.ascontiguousarray(value.numpy() if isinstance(value, Tensor) else value, dtype=self._rows.dtype)
        count = data.size // max(1, int(np.prod(self._rows.row_shape)))
        if not 0 <= start <= start + count <= self._num_rows:
            raise IndexError(f"rows {start}..{start + count} outside 0..{self._num_rows}")
        os.pwrite(self._fd, data.tobytes(), self._rows.offset + start * self._rows.row_bytes)


def _open(path: Path, shape: tuple[int | None, ...], dtype: np.dtype) -> Tensor | None:
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, e)
        return None
    fits = len(array.shape) == len(shape) and all(e is None or e == a for a, e in zip(array.shape, shape, strict=True))
    if not fits or array.dtype != dtype:
        logger.warning("ignoring cache file %s: %s %s, expected %s %s; rebuilding it",
                       path, array.dtype, array.shape, dtype, tuple(shape))
        return None
    tensor = torch.from_numpy(array)
    tensor.disk_rows = DiskRows(path, int(array.offset), tuple(array.shape[1:]), array.dtype)  # type: ignore[attr-defined]
    return tensor


def read_array(path: Path, shape: tuple[int | None, ...], dtype: np.dtype | type) -> Tensor | None:
    """The array in ``path`` as a mapped tensor with ``disk_rows``, or None when the file is missing or not of
    ``shape`` / ``dtype`` (a None in ``shape`` matches any size)."""
    return _open(path, shape, np.dtype(dtype)) if path.is_file() else None


def write_array(path: Path, shape: tuple[int, ...], dtype: np.dtype | type,
                fill: Callable[[RowWriter], None]) -> Tensor:
    """Create ``path`` as a ``.npy`` of ``shape``, let ``fill(writer)`` store its rows, and return it mapped.

    The file appears complete or not at all (written beside, then renamed).
    """
    dtype = np.dtype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "r+b") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": tuple(shape)})
            offset = f.tell()
            f.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
            fill(RowWriter(f.fileno(), DiskRows(path, offset, tuple(shape[1:]), dtype), shape[0]))
    mapped = read_array(path, shape, dtype)
    if mapped is None:
        raise OSError(f"{path}: the array just written cannot be read back")
    return mapped
