"""A synthetic classification dataset in which the context decides the label.

``write_context_dataset(root)`` writes ``root/images/*.png``, ``root/train.jsonl`` and ``root/test.jsonl``
in the format of :mod:`mmfuse.data.classify`::

    {"image": "images/00003.png", "context": "the red object", "label": "triangle"}          (context="text")
    {"image": "images/00003.png", "context_image": "contexts/red.png", "label": "triangle"}  (context="image")

**Scenes.** A white square holds ``num_objects`` objects (at most ``len(SHAPES)``), each of a different
colour of :data:`COLORS` and a different shape of :data:`SHAPES`, each in its own cell of a 3 x 3 grid
(``label="shape"``) or in its own quadrant (``label="position"``) at a random offset. **Examples.** Every
object of every image is asked about once: the context names its colour (text) or shows it (an image
holding only a patch of that colour, so it shows no shape), and the label is its shape, or the quadrant
it sits in (:data:`QUADRANTS`). An image therefore appears ``num_objects`` times with ``num_objects``
different labels: a classifier that cannot see the context scores ``1 / num_objects`` at best, whatever
it learns from the image, while one that reads the context can score 100%.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmfuse.io import atomic_write_text

from .relational import COLORS

__all__ = ["COLORS", "QUADRANTS", "SHAPES", "write_context_dataset"]

logger = logging.getLogger(__name__)

SHAPES = ("square", "circle", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
_BACKGROUND = (255, 255, 255)


def write_context_dataset(root: str | Path, *, num_train_images: int = 1000, num_test_images: int = 250,
                          image_size: int = 64, num_objects: int = 4,
                          context: Literal["text", "image"] = "text", label: Literal["shape", "position"] = "shape",
                          seed: int = 0, progress: bool | None = None) -> Path:
    """Write the dataset of the module docstring into ``root`` and return ``root`` (same arguments, same files)."""
    if num_train_images < 1 or num_test_images < 1:
        raise ValueError(f"num_train_images and num_test_images must be >= 1, got {num_train_images}, "
                         f"{num_test_images}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 (objects are image_size // 5 wide), got {image_size}")
    if not 2 <= num_objects <= len(SHAPES):
        raise ValueError(f"num_objects must be in [2, {len(SHAPES)}] (one shape each), got {num_objects}")
    if label not in ("shape", "position"):
        raise ValueError(f"label must be 'shape' or 'position', got {label!r}")
    if context not in ("text", "image"):
        raise ValueError(f"context must be 'text' or 'image', got {context!r}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if context == "image":
        (root / "contexts").mkdir(exist_ok=True)
        for name, rgb in COLORS.items():
            _swatch(rgb, image_size).save(root / "contexts" / f"{name}.png")

    total = num_train_images + num_test_images
    width = max(5, len(str(total - 1)))
    rows: dict[str, list[str]] = {"train": [], "test": []}
    disable = None if progress is None else not progress
    for i in tqdm(range(total), desc="context", unit="img", disable=disable, leave=False):
        scene = _sample_scene(rng, image_size, num_objects, 2 if label == "position" else 3)
        name = f"images/{i:0{width}d}.png"
        _draw(scene, image_size).save(root / name)
        split = "train" if i < num_train_images else "test"
        for color, shape, cell, _ in scene:
            target = shape if label == "shape" else QUADRANTS[cell]
            line = ({"image": name, "context": f"the {color} object", "label": target} if context == "text"
                    else {"image": name, "context_image": f"contexts/{color}.png", "label": target})
            rows[split].append(json.dumps(line) + "\n")
    for split, lines in rows.items():  # the split files last: a directory holding them holds a whole dataset
        atomic_write_text(root / f"{split}.jsonl", "".join(lines))
    logger.info("wrote %d train / %d test examples over %d images to %s", len(rows["train"]), len(rows["test"]),
                total, root)
    return root


Scene = list[tuple[str, str, int, tuple[int, int]]]  # (colour, shape, cell, top-left corner)


def _sample_scene(rng: np.random.Generator, size: int, n: int, grid: int) -> Scene:
    """n objects in a grid x grid layout: distinct colours, distinct shapes, distinct cells (row-major)."""
    colors = rng.choice(len(COLORS), size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    cells = rng.choice(grid * grid, size=n, replace=False)
    cell, side = size // grid, size // 5
    names = list(COLORS)
    out = []
    for c, s, k in zip(colors, shapes, cells, strict=True):
        x = (k % grid) * cell + int(rng.integers(0, cell - side))
        y = (k // grid) * cell + int(rng.integers(0, cell - side))
        out.append((names[c], SHAPES[s], int(k), (x, y)))
    return out


def _draw(scene: Scene, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    side = size // 5
    for color, shape, _, (x, y) in scene:
        fill = COLORS[color]
        x1, y1 = x + side - 1, y + side - 1  # Pillow boxes include their last pixel
        if shape == "square":
            draw.rectangle((x, y, x1, y1), fill=fill)
        elif shape == "circle":
            draw.ellipse((x, y, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(x + side / 2, y), (x1, y1), (x, y1)], fill=fill)
        else:  # a plus sign, arms a third of the side wide
            t = max(1, side // 3)
            draw.rectangle((x + t, y, x1 - t, y1), fill=fill)
            draw.rectangle((x, y + t, x1, y1 - t), fill=fill)
    return image


def _swatch(rgb: tuple[int, int, int], size: int) -> Image.Image:
    """A context image that shows a colour and no shape: the whole image in that colour."""
    return Image.new("RGB", (size, size), rgb)
