"""Decoding image files into uint8 tensors, and the one error type of the data layer.

Every image, whatever its file format and mode, becomes a ``(3, size, size)`` uint8 RGB tensor:

- transparency (RGBA, LA, PA, palette or grey images with a transparent colour) is composited onto a
  white background, so a transparent pixel reads as white whatever colour the file stores under it;
- 16- and 32-bit integer grey images (``I;16*``, ``I``) are read as 16-bit values and scaled to 8 bits
  (``round(v * 255 / 65535)``, values outside 0..65535 clipped);
- every other mode (L, 1, P, CMYK, YCbCr, ...) goes through Pillow's own conversion to RGB;
- an EXIF orientation tag is applied first, so photos come out upright;
- any size is resized to ``size x size`` with Pillow's bilinear filter (which widens its support when
  shrinking, so downscaling is antialiased). The aspect ratio is *not* preserved: a non-square image is
  stretched, never cropped or padded, so every pixel of the source stays in view.

Normalisation (mean / std, float conversion) is the model's business, not the data layer's.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["DataError", "load_image", "load_images"]

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


def load_image(path: str | Path, size: int) -> Tensor:
    """Decode one image file into a ``(3, size, size)`` uint8 RGB tensor (see the module docstring).

    Raises :class:`DataError` naming the file when it is missing, empty, corrupt or of an unsupported mode.
    """
    _check_size(size)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found", path=path)
    try:
        with Image.open(path) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            rgb = _to_rgb(im)
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})", path=path) from e
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


def load_images(
    paths: Sequence[str | Path], size: int, *, desc: str = "images", progress: bool | None = None
) -> Tensor:
    """Decode ``paths`` into one ``(M, 3, size, size)`` uint8 tensor, row ``i`` from ``paths[i]``.

    ``progress``: show a tqdm bar on stderr; ``None`` shows it only when stderr is a terminal.
    """
    _check_size(size)
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    disable = None if progress is None else not progress  # tqdm: None = off unless a tty
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=disable, leave=False)):
        out[i] = load_image(path, size)
    return out
