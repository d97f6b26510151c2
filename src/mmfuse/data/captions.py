"""Caption datasets: JSONL directories of images with one or several reference captions, and a built-in
offline scene-description generator.

One JSON object a line in ``<split>.jsonl`` (blank lines skipped)::

    {"image": "images/0001.png", "caption": "a small red circle and a large blue square"}
    {"image": "images/0002.png", "captions": ["a dog on grass", "a brown dog running"]}

``image`` is relative to the dataset directory (the rules of :mod:`mmfuse.data.jsonl`). Lines naming the
same image add references to it. :class:`CaptionSplit` holds one row per image with all of its references.

**Built-in scenes** (:func:`write_caption_dataset`, ``mmfuse make-dataset captions``): a square canvas of
random side (64-112 pixels) on a random light background holds 2-4 objects, each a size (``small``:
9-14% of the canvas side, ``large``: 20-28%), a colour of :data:`CAPTION_COLORS` (each channel jittered
by up to 20) and a shape of :data:`CAPTION_SHAPES`. Objects never overlap and their centres are at least
6% of the side apart horizontally, so "left to right" is never ambiguous. The caption names them left to
right: ``"a small red circle, a large blue square and a small green triangle"``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm.auto import tqdm

from mmfuse.io import atomic_write_text

from .images import DataError
from .jsonl import _numbered_lines, _resolve_image, split_file
from .storage import ImageStorage, decoded_images

__all__ = ["CAPTION_COLORS", "CAPTION_SHAPES", "CaptionSplit", "describe", "load_caption_split",
           "normalize_caption", "write_caption_dataset"]

logger = logging.getLogger(__name__)

CAPTION_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (235, 205, 0),
    "orange": (255, 140, 0),
    "purple": (140, 50, 190),
    "gray": (120, 120, 120),
}
CAPTION_SHAPES = ("circle", "square", "triangle")
_SIZES = {"small": (0.09, 0.14), "large": (0.20, 0.28)}  # object side as a fraction of the canvas side
_MIN_DX = 0.06  # horizontal distance between centres, fraction of the side
_GAP = 2  # pixels between two objects' boxes
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


@dataclass
class CaptionSplit:
    """One row per image: ``images`` (M, 3, S, S) uint8, ``captions[i]`` the references of image i."""

    images: Tensor
    captions: list[list[str]]
    image_paths: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.captions) != self.images.shape[0] or len(self.image_paths) != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {len(self.captions)} caption lists and "
                             f"{len(self.image_paths)} paths")

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.captions)


def normalize_caption(text: str) -> str:
    """Lower-cased tokens joined by single spaces: what exact match and BLEU/CIDEr compare."""
    return " ".join(_TOKEN_RE.findall(text.lower()))


def load_caption_split(root: str | Path, split: str, *, image_size: int = 64, progress: bool | None = None,
                       storage: ImageStorage | str = "auto") -> CaptionSplit:
    """Read ``root/<split>.jsonl`` (format in the module docstring) and decode its images, in memory or on
    disk as ``storage`` says (:mod:`mmfuse.data.storage`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data {str(root)!r} is not a caption dataset directory (one holding train.jsonl and "
                        "test.jsonl; `mmfuse make-dataset captions --out DIR` writes one)")
    path = split_file(root, split)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (a caption dataset holds train.jsonl and test.jsonl)",
                        path=path)
    base = root.resolve()
    refs: dict[Path, list[str]] = {}  # image -> references, in order of first appearance
    first_line: dict[Path, int] = {}
    for n, line in _numbered_lines(path):
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e}", path=path) from e
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise DataError(f"{where}: expected an object with a string 'image'", path=path)
        captions = obj.get("captions", [obj["caption"]] if "caption" in obj else None)
        if (not isinstance(captions, list) or not captions
                or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise DataError(f"{where}: expected 'caption' (a non-empty string) or 'captions' (a non-empty list "
                            "of them)", path=path)
        image = _resolve_image(where, path, obj["image"], base)
        first_line.setdefault(image, n)
        refs.setdefault(image, []).extend(captions)
    if not refs:
        raise DataError(f"{path}: no examples", path=path)
    try:
        images = decoded_images(list(refs), image_size, desc=f"{base.name}/{split}", progress=progress,
                                storage=storage)
    except DataError as e:
        line = first_line.get(Path(e.path)) if e.path else None
        if line is None:
            raise
        raise DataError(f"{path} line {line}: {e}", path=path) from e
    return CaptionSplit(images, list(refs.values()), [str(p) for p in refs], name=f"{base.name}/{split}")


# --------------------------------------------------------------------------------------------------
# the built-in scene generator


@dataclass(frozen=True)
class _Object:
    size: str
    color: str
    shape: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)


def describe(objects: Sequence[tuple[str, str, str]]) -> str:
    """``[(size, colour, shape), ...]`` left to right -> ``"a small red circle, ... and a large blue square"``."""
    parts = [f"a {size} {color} {shape}" for size, color, shape in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _sample_scene(rng: np.random.Generator, side: int, n: int) -> list[_Object]:
    for _ in range(1000):
        objects: list[_Object] = []
        for _ in range(n):
            size = ("small", "large")[int(rng.integers(2))]
            lo, hi = _SIZES[size]
            w = max(5, round(float(rng.uniform(lo, hi)) * side))
            for _ in range(50):
                x0, y0 = (int(v) for v in rng.integers(1, side - w - 1, size=2))
                box = (x0, y0, x0 + w - 1, y0 + w - 1)
                if all(_apart(box, o.box, side) for o in objects):
                    color = list(CAPTION_COLORS)[int(rng.integers(len(CAPTION_COLORS)))]
                    objects.append(_Object(size, color, CAPTION_SHAPES[int(rng.integers(len(CAPTION_SHAPES)))], box))
                    break
            else:
                break  # no room left: start the scene again
        if len(objects) == n:
            return sorted(objects, key=lambda o: o.box[0] + o.box[2])
    raise RuntimeError(f"could not place {n} objects on a {side}x{side} canvas")


def _apart(a: tuple[int, ...], b: tuple[int, ...], side: int) -> bool:
    separate = a[2] + _GAP < b[0] or b[2] + _GAP < a[0] or a[3] + _GAP < b[1] or b[3] + _GAP < a[1]
    return separate and abs((a[0] + a[2]) - (b[0] + b[2])) / 2 >= _MIN_DX * side


def _draw(rng: np.random.Generator, side: int, objects: Sequence[_Object]) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    for o in objects:
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in CAPTION_COLORS[o.color])
        x0, y0, x1, y1 = o.box
        if o.shape == "square":
            draw.rectangle(o.box, fill=fill)
        elif o.shape == "circle":
            draw.ellipse(o.box, fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def write_caption_dataset(root: str | Path, *, num_train_images: int = 8000, num_test_images: int = 1000,
                          min_objects: int = 2, max_objects: int = 4, min_side: int = 64, max_side: int = 112,
                          seed: int = 0, progress: bool | None = None) -> Path:
    """Write the scene dataset of the module docstring into ``root`` (``images/``, ``train.jsonl``,
    ``test.jsonl``, one ``{"image", "caption"}`` line per image) and return ``root``.

    The same arguments give the same files.
    """
    if num_train_images < 1 or num_test_images < 1:
        raise ValueError(f"need >= 1 train and test images, got {num_train_images} and {num_test_images}")
    if not 1 <= min_objects <= max_objects <= 6:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 6, got {min_objects}, {max_objects}")
    if not 48 <= min_side <= max_side:
        raise ValueError(f"need 48 <= min_side <= max_side, got {min_side}, {max_side}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = num_train_images + num_test_images
    width = max(5, len(str(total - 1)))
    rows: dict[str, list[str]] = {"train": [], "test": []}
    disable = None if progress is None else not progress
    for i in tqdm(range(total), desc="captions", unit="img", disable=disable, leave=False):
        side = int(rng.integers(min_side, max_side + 1))
        objects = _sample_scene(rng, side, int(rng.integers(min_objects, max_objects + 1)))
        name = f"images/{i:0{width}d}.png"
        _draw(rng, side, objects).save(root / name)
        caption = describe([(o.size, o.color, o.shape) for o in objects])
        rows["train" if i < num_train_images else "test"].append(json.dumps({"image": name, "caption": caption}))
    for split, lines in rows.items():  # the split files last: a directory holding them holds a whole dataset
        atomic_write_text(root / f"{split}.jsonl", "".join(line + "\n" for line in lines))
    logger.info("wrote %d train / %d test captioned images to %s", num_train_images, num_test_images, root)
    return root

