from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ImageWriter = Callable[..., Path]


def _image(mode: str, size: tuple[int, int], color: object) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.full(size[::-1], color, dtype=np.uint16))
    if mode == "P":  # palette entry 0 = black, 1 = `color`; every pixel uses entry 1
        im = Image.new("P", size, 1)
        im.putpalette([0, 0, 0, *color] + [0] * (3 * 254))
        return im
    return Image.new(mode, size, color)


@pytest.fixture
def write_image() -> ImageWriter:
    """``write_image(path, mode, size, color, **save_kwargs)``: a uniform image file made with Pillow."""

    def write(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8), color: object = (10, 20, 30),
              **save_kwargs: object) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        _image(mode, size, color).save(path, **save_kwargs)
        return path

    return write
