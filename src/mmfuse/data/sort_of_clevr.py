"""Sort-of-CLEVR as defined by Santoro et al. 2017 ("A simple neural network module for relational
reasoning", arXiv:1706.01427, section 4 and appendix).

``write_sort_of_clevr(root)`` writes ``root/images/*.png``, ``root/train.jsonl``, ``root/test.jsonl``
(the format of :mod:`mmfuse.data.jsonl`, every line with a ``kind``, ``"relational"`` or
``"non-relational"``) and ``root/objects.json``, the ground truth of every scene, so the answers can be
recomputed independently::

    {"image_size": 75, "object_radius": 5, "background": [255, 255, 255], "colors": {"red": [255, 0, 0], ...},
     "images": {"images/00000.png": [{"color": "red", "shape": "square", "center": [12, 40]}, ...]}}

``center`` is ``[x, y]`` in pixels, y pointing down; an object covers the ``2 * radius`` pixels
``center - radius .. center + radius - 1`` along each axis (a circle is inscribed in that square).

**Scenes** (the paper's): a white (``background``) ``image_size`` square (75 px) holds six objects, one of each colour
of :data:`PAPER_COLORS`, each a square or a circle (a fair coin), at uniformly random integer centres
inside the image. Objects never overlap: their squares keep at least one pixel apart. A scene is
redrawn when, for some object, the closest or the furthest other object is not unique (two centres
equally far, within half a pixel), so every relational answer is well defined.

**Questions** (``<c>`` names an object's colour). Non-relational, one object answers::

    what shape is the <c> object?                       -> square | circle
    is the <c> object on the left or on the right?      -> left | right    (centre x < image_size / 2)
    is the <c> object at the top or at the bottom?      -> top | bottom    (centre y < image_size / 2)

Relational, the answer depends on the other objects::

    what shape is the object closest to the <c> object?       -> square | circle
    what shape is the object furthest from the <c> object?    -> square | circle
    how many objects have the same shape as the <c> object?   -> "0" .. "5"

The count leaves the ``<c>`` object out, as the paper's reference generator does. Every image gets
``questions_per_kind`` distinct non-relational and as many distinct relational questions (10 and 10 in
the paper), each drawn uniformly from that kind's 3 x 6 (template, colour) pairs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmfuse.data.relational import SHAPES, SceneObject
from mmfuse.io import atomic_write_text

__all__ = ["KINDS", "PAPER_COLORS", "answer", "draw_scene", "sample_scene", "write_sort_of_clevr"]

logger = logging.getLogger(__name__)

# The paper's six colours (its reference generator's RGB values).
PAPER_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}
KINDS = ("non-relational", "relational")

_TIE_MARGIN = 0.5  # px: the closest / furthest object must beat the runner-up by this much
_MAX_TRIES = 10_000  # placements per scene; at 75 px and radius 5 nearly every placement is kept
_BACKGROUND = (255, 255, 255)

Scene = Sequence[SceneObject]


def _by_distance(scene: Scene, k: int) -> list[tuple[float, SceneObject]]:
    """(distance, object) for the objects other than ``scene[k]``, nearest first."""
    kx, ky = scene[k].center
    others = [(float(np.hypot(o.center[0] - kx, o.center[1] - ky)), o) for j, o in enumerate(scene) if j != k]
    return sorted(others, key=lambda t: t[0])


# (template, answer(scene, k, image_size)); ``{c}`` is the colour of object k.
Template = tuple[str, Callable[[Scene, int, int], str]]

_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "non-relational": (
        ("what shape is the {c} object?", lambda s, k, size: s[k].shape),
        ("is the {c} object on the left or on the right?",
         lambda s, k, size: "left" if s[k].center[0] < size / 2 else "right"),
        ("is the {c} object at the top or at the bottom?",
         lambda s, k, size: "top" if s[k].center[1] < size / 2 else "bottom"),
    ),
    "relational": (
        ("what shape is the object closest to the {c} object?", lambda s, k, size: _by_distance(s, k)[0][1].shape),
        ("what shape is the object furthest from the {c} object?",
         lambda s, k, size: _by_distance(s, k)[-1][1].shape),
        ("how many objects have the same shape as the {c} object?",
         lambda s, k, size: str(sum(o.shape == s[k].shape for j, o in enumerate(s) if j != k))),
    ),
}


def answer(scene: Scene, question: str, image_size: int) -> str:
    """The answer to one of the module's questions about ``scene`` (raises ``ValueError`` for others)."""
    for templates in _TEMPLATES.values():
        for template, fn in templates:
            for k, o in enumerate(scene):
                if template.format(c=o.color) == question:
                    return fn(scene, k, image_size)
    raise ValueError(f"not a Sort-of-CLEVR question about this scene: {question!r}")


def write_sort_of_clevr(
    root: str | Path,
    *,
    num_train_images: int = 9800,
    num_test_images: int = 200,
    image_size: int = 75,
    object_radius: int = 5,
    questions_per_kind: int = 10,
    seed: int = 0,
    background: tuple[int, int, int] = (255, 255, 255),
    progress: bool | None = None,
) -> Path:
    """Write the dataset described in the module docstring into ``root`` and return ``root``.

    The defaults are the paper's (10,000 images, 75 px, radius 5, 10 + 10 questions per image). The
    same arguments give the same files. ``background``: the RGB fill behind the objects (the paper's is
    white; another tests whether a model carries over to images drawn in another style). ``progress``: a
    tqdm bar on stderr; ``None`` shows it only when stderr is a terminal. Raises ``ValueError`` if an
    argument is out of range.
    """
    _check_args(num_train_images, num_test_images, image_size, object_radius, questions_per_kind)
    if len(background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in background):
        raise ValueError(f"background must be three integers in [0, 255] (R, G, B), got {background!r}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = num_train_images + num_test_images
    width = max(5, len(str(total - 1)))

    rows: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    scenes: dict[str, list[dict[str, object]]] = {}
    disable = None if progress is None else not progress  # tqdm: None = off unless a tty
    for i in tqdm(range(total), desc="sort-of-clevr", unit="img", disable=disable, leave=False):
        scene = sample_scene(rng, image_size, object_radius)
        name = f"images/{i:0{width}d}.png"
        draw_scene(scene, image_size, object_radius, background=tuple(background)).save(root / name)
        scenes[name] = [{"color": o.color, "shape": o.shape, "center": [int(v) for v in o.center]} for o in scene]
        split = "train" if i < num_train_images else "test"
        for kind in KINDS:
            pool = [(t, k) for t in _TEMPLATES[kind] for k in range(len(scene))]
            for j in rng.choice(len(pool), size=min(questions_per_kind, len(pool)), replace=False):
                (template, fn), k = pool[j]
                rows[split].append({"image": name, "question": template.format(c=scene[k].color),
                                    "answer": fn(scene, k, image_size), "kind": kind})

    # The split files go last: a directory holding them holds a whole dataset.
    atomic_write_text(root / "objects.json", json.dumps(
        {"image_size": image_size, "object_radius": object_radius, "background": list(background),
         "colors": {c: list(v) for c, v in PAPER_COLORS.items()}, "images": scenes}) + "\n")
    for split, lines in rows.items():
        atomic_write_text(root / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    logger.info("wrote %d train / %d test questions over %d images to %s",
                len(rows["train"]), len(rows["test"]), total, root)
    return root


def _check_args(num_train: int, num_test: int, image_size: int, radius: int, per_kind: int) -> None:
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train_images and num_test_images must be >= 1, got {num_train} and {num_test}")
    if radius < 2:
        raise ValueError(f"object_radius must be >= 2 (a circle and a square must differ), got {radius}")
    if image_size < 4 * (2 * radius + 1):
        raise ValueError(f"image_size must be >= 4 * (2 * object_radius + 1) = {4 * (2 * radius + 1)} so six "
                         f"objects of radius {radius} fit apart easily, got {image_size}")
    if not 1 <= per_kind <= 3 * len(PAPER_COLORS):
        raise ValueError(f"questions_per_kind must be in [1, {3 * len(PAPER_COLORS)}], got {per_kind}")


def sample_scene(rng: np.random.Generator, image_size: int, radius: int) -> list[SceneObject]:
    """Six non-overlapping objects, one per colour, with unambiguous closest and furthest neighbours."""
    names = list(PAPER_COLORS)
    for _ in range(_MAX_TRIES):
        centers: list[tuple[int, int]] = []
        for _ in range(100 * len(names)):  # a crowded start can leave no room: then start over
            x, y = (int(v) for v in rng.integers(radius, image_size - radius + 1, size=2))
            # Squares of side 2r with a one-pixel gap: max(|dx|, |dy|) >= 2r + 1.
            if all(max(abs(x - cx), abs(y - cy)) >= 2 * radius + 1 for cx, cy in centers):
                centers.append((x, y))
                if len(centers) == len(names):
                    break
        if len(centers) < len(names):
            continue
        shapes = rng.integers(0, len(SHAPES), size=len(names))
        scene = [SceneObject(n, SHAPES[s], (float(x), float(y)))
                 for n, s, (x, y) in zip(names, shapes, centers, strict=True)]
        if _unambiguous(scene):
            return scene
    raise RuntimeError(f"no unambiguous layout in {_MAX_TRIES} tries")


def _unambiguous(scene: Scene) -> bool:
    for k in range(len(scene)):
        d = [t[0] for t in _by_distance(scene, k)]
        if d[1] - d[0] < _TIE_MARGIN or d[-1] - d[-2] < _TIE_MARGIN:
            return False
    return True


def draw_scene(scene: Scene, image_size: int, radius: int,
               colors: dict[str, tuple[int, int, int]] = PAPER_COLORS,
               background: tuple[int, int, int] = _BACKGROUND) -> Image.Image:
    """The RGB image of ``scene`` on ``background``: each object fills the square ``center - r .. center + r - 1``."""
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for o in scene:
        x0, y0 = int(o.center[0]) - radius, int(o.center[1]) - radius
        box = (x0, y0, x0 + 2 * radius - 1, y0 + 2 * radius - 1)  # Pillow boxes include their last pixel
        (draw.rectangle if o.shape == "square" else draw.ellipse)(box, fill=colors[o.color])
    return image
