"""Decoding image files into uint8 tensors, and the one error type of the data layer.

Every image, whatever its file format and mode, becomes a ``(3, size, size)`` uint8 RGB tensor:

- transparency (RGBA, LA, PA, palette or grey images with a transparent colour) is composited onto a
  white background, so a transparent pixel reads as white whatever colour the file stores under it;
- 16- and 32-bit integer grey images (``I;16*``, ``I``) are read as 16-bit values and scaled to 8 bits
  (``round(v * 255 / 65535)``, values outside 0..65535 clipped);
- every other mode (L, 1, P, CMYK, YCbCr, ...) goes through Pillow's own conversion to RGB;
- an EXIF orientation tag is applied first, so photos come out upright;
- any size is resized to ``size x size`` with Pillow's bilinear filter (which widens its support when
  shrinking, so downscaling is antialiased). ``resize`` says what becomes of the aspect ratio:
  ``"squash"`` (the default) stretches a non-square image, so every pixel of the source stays in view;
  ``"pad"`` keeps the ratio, scaling the longer side to ``size`` and centring the image on black;
  ``"crop"`` keeps the ratio, scaling the shorter side to ``size`` and cutting the centre square.

Normalisation (mean / std, float conversion) is the model's business, not the data layer's.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["RESIZE_MODES", "DataError", "decode_image_bytes", "load_image", "load_images"]

RESIZE_MODES = ("squash", "pad", "crop")

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# What Pillow raises on a truncated, corrupt or hostile file varies with the format plugin.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class DataError(ValueError):
    """A dataset file is missing, malformed or undecodable; the message names the file (and line).

    ``path`` is the offending file when one is known, so callers can add context (a JSONL line number).
    """

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


MAX_IMAGE_SIZE = 2048  # decoded images are held as (3, S, S) uint8: 12 MiB each at this size


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int in [1, {MAX_IMAGE_SIZE}], got {size!r}")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _WIDE_INT_MODES:
        wide = np.asarray(im).astype(np.int64)
        grey = (np.clip(wide, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | Path, size: int, *, resize: str = "squash") -> Tensor:
    """Decode one image file into a ``(3, size, size)`` uint8 RGB tensor (see the module docstring).

    Raises :class:`DataError` naming the file when it is missing, empty, corrupt or of an unsupported mode.
    """
    _check_size(size)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found", path=path)
    return _decode(path, size, str(path), path, resize)


def decode_image_bytes(data: bytes, size: int, *, name: str, resize: str = "squash") -> Tensor:
    """:func:`load_image` for an encoded image held in memory (a Parquet cell); errors name ``name``."""
    _check_size(size)
    return _decode(io.BytesIO(data), size, name, None, resize)


def _square(rgb: Image.Image, size: int, resize: str) -> Image.Image:
    w, h = rgb.size
    if resize == "squash" or w == h:
        return rgb if (w, h) == (size, size) else rgb.resize((size, size), Image.Resampling.BILINEAR)
    scale = size / (max(w, h) if resize == "pad" else min(w, h))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    scaled = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
    if resize == "crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        return scaled.crop((left, top, left + size, top + size))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(scaled, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def _decode(source: Path | io.BytesIO, size: int, name: str, path: Path | None, resize: str = "squash") -> Tensor:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    try:
        with Image.open(source) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            rgb = _to_rgb(im)
    except _DECODE_ERRORS as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e})", path=path) from e
    rgb = _square(rgb, size, resize)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


def load_images(
    paths: Sequence[str | Path], size: int, *, desc: str = "images", progress: bool | None = None,
    out: Any = None, resize: str = "squash",
) -> Tensor:
    """Decode ``paths`` into one ``(M, 3, size, size)`` uint8 tensor, row ``i`` from ``paths[i]``.

    ``progress``: show a tqdm bar on stderr; ``None`` shows it only when stderr is a terminal. ``out``: where
    to put row ``i`` (``out[i] = image``) instead of a new tensor, e.g. a file on disk; it is returned.
    """
    _check_size(size)
    if out is None:
        out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    disable = None if progress is None else not progress  # tqdm: None = off unless a tty
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=disable, leave=False)):
        out[i] = load_image(path, size, resize=resize)
    return out
