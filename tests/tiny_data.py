"""A tiny JSONL VQA dataset for tests: red or blue squares and circles on white.

``make_tiny_dataset(root)`` writes ``root/images/*.png``, ``root/train.jsonl`` and ``root/test.jsonl``
(two thirds of the images for training, the rest for testing) and returns ``root``. Every image gets
three questions, each with an ``answer_type``::

    "what color is the shape?" -> red | blue          (color)
    "what shape is it?"        -> square | circle     (shape)
    "is there a red shape?"    -> yes | no            (yes/no)

Colours and shapes alternate so both splits hold every answer; position and size vary with the
index so no two images are the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["make_tiny_dataset"]

_COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def _example(i: int, size: int) -> tuple[Image.Image, str, str]:
    color = ("red", "blue")[i % 2]
    shape = ("square", "circle")[(i // 2) % 2]
    side = size // 2 + (i % 3) * max(1, size // 16)
    x0 = (i * 3) % max(1, size - side)
    y0 = (i * 5) % max(1, size - side)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    if shape == "square":
        draw.rectangle(box, fill=_COLORS[color])
    else:
        draw.ellipse(box, fill=_COLORS[color])
    return image, color, shape


def make_tiny_dataset(root: str | Path, n_images: int = 24, size: int = 32) -> Path:
    """Write the dataset described in the module docstring into ``root``; returns ``root``."""
    if n_images < 6:
        raise ValueError(f"n_images must be >= 6 so both splits hold every answer, got {n_images}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_train = (2 * n_images) // 3
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for i in range(n_images):
        image, color, shape = _example(i, size)
        name = f"images/{i:04d}.png"
        image.save(root / name)
        qa = [("what color is the shape?", color, "color"), ("what shape is it?", shape, "shape"),
              ("is there a red shape?", "yes" if color == "red" else "no", "yes/no")]
        split = "train" if i < n_train else "test"
        rows[split] += [json.dumps({"image": name, "question": q, "answer": a, "answer_type": t})
                        for q, a, t in qa]
    for split, lines in rows.items():
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
