"""A synthetic Sort-of-CLEVR-style dataset whose relational questions need attention over image positions.

``write_relational_dataset(root)`` writes ``root/images/*.png``, ``root/train.jsonl``, ``root/test.jsonl``
(the format of :mod:`mmfuse.data.jsonl`, every line with an ``answer_type``) and ``root/objects.json``,
the ground truth of every scene, so the answers can be checked independently::

    {"image_size": 64, "object_size": 8, "colors": {"red": [230, 25, 25], ...},
     "images": {"images/00000.png": [{"color": "red", "shape": "square", "center": [12.0, 40.0]}, ...]}}

``center`` is ``[x, y]`` in pixels, y pointing down, on the continuous scale where pixel ``(i, j)``
covers ``[i, i + 1) x [j, j + 1)``.

**Scenes.** A white ``image_size`` square holds ``num_objects`` objects, each a different colour of
:data:`COLORS` and a square or a circle, all ``image_size // 8`` pixels wide. The image is cut into a
4 x 4 grid; each object sits in its own cell at a random offset that leaves at least one pixel to the
cell's edge, so objects never touch and none straddles the vertical or horizontal midline. Positions
are resampled until, for every object, the closest and the farthest other object are unambiguous: the
runner-up is at least half an object width further (resp. nearer) than the winner.

**Questions** (``<c>`` is the colour of an object in the scene). ``"non-relational"``: one object
answers it::

    what shape is the <c> object?            -> square | circle
    is the <c> object on the left?           -> yes | no    (its centre x < image_size / 2)
    is the <c> object at the top?            -> yes | no    (its centre y < image_size / 2)

``"relational"``: the answer depends on the other objects::

    what shape is the object closest to the <c> object?     -> square | circle
    what shape is the object farthest from the <c> object?  -> square | circle
    what color is the object closest to the <c> object?     -> a colour of COLORS
    how many objects have the same shape as the <c> object? -> "1" .. str(num_objects)
                                                               (the count includes the <c> object itself)

Each image gets ``questions_per_image`` distinct questions, half of each type (the odd one
non-relational), drawn uniformly from that type's (template, object) pairs; fewer where a scene has
fewer pairs than that.

**Why pooled-vector fusion fails on the relational questions.** Closest and farthest depend on where
two objects are *relative to each other*. A fusion that averages the image tokens over positions before
it sees the question (``concat``, ``late``, ``product``) keeps how much of each feature the image holds
but not which feature is where relative to which: it can only answer if the encoder has already written
every pairwise relation of every object into that one vector. Text-to-image attention reads the tokens
at the queried object's position, so the question selects what to pool; with position features in the
image tokens, the relation can be computed from what the selected positions hold. The count question
needs the queried object's shape compared with every other object's, a binding of colour to shape that
averaging also blurs. The non-relational questions are the control: each asks about one object.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmfuse.io import atomic_write_text

__all__ = ["COLORS", "QUESTIONS_PER_IMAGE", "SHAPES", "SceneObject", "write_relational_dataset"]

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "orange": (255, 140, 0),
    "gray": (128, 128, 128),
    "yellow": (235, 205, 0),
}
SHAPES = ("square", "circle")
QUESTIONS_PER_IMAGE = 10

_GRID = 4  # cells per side; even, so the midlines are cell borders and "left" / "top" are never borderline
_TIE_MARGIN = 0.5  # closest / farthest must beat the runner-up by this fraction of the object width
_MAX_TRIES = 10_000  # position resamples per image; acceptance is ~1/8 for 4 objects, ~1/70 for 6
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    center: tuple[float, float]  # (x, y) in pixels, y down


Scene = Sequence[SceneObject]


def write_relational_dataset(
    root: str | Path,
    *,
    num_train_images: int = 4000,
    num_test_images: int = 1000,
    image_size: int = 64,
    num_objects: int = 4,
    questions_per_image: int = QUESTIONS_PER_IMAGE,
    seed: int = 0,
    progress: bool | None = None,
) -> Path:
    """Write the dataset described in the module docstring into ``root`` and return ``root``.

    The same arguments give the same files. ``progress``: a tqdm bar on stderr; ``None`` shows it only
    when stderr is a terminal. Raises ``ValueError`` if an argument is out of range, or if an answer of
    the test split never occurs in the training split (it cannot be learnt; use more training images).
    """
    _check_args(num_train_images, num_test_images, image_size, num_objects, questions_per_image)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = image_size // 8
    total = num_train_images + num_test_images
    width = max(5, len(str(total - 1)))

    rows: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    scenes: dict[str, list[dict[str, object]]] = {}
    disable = None if progress is None else not progress  # tqdm: None = off unless a tty
    for i in tqdm(range(total), desc="relational", unit="img", disable=disable, leave=False):
        scene = _sample_scene(rng, image_size, side, num_objects)
        name = f"images/{i:0{width}d}.png"
        _draw(scene, image_size, side).save(root / name)
        scenes[name] = [{"color": o.color, "shape": o.shape, "center": list(o.center)} for o in scene]
        split = "train" if i < num_train_images else "test"
        rows[split] += [{"image": name, "question": q, "answer": a, "answer_type": t}
                        for q, a, t in _questions(rng, scene, image_size, questions_per_image)]

    unseen = sorted({r["answer"] for r in rows["test"]} - {r["answer"] for r in rows["train"]})
    if unseen:
        raise ValueError(f"test answers {unseen} never occur in the training split "
                         f"({num_train_images} images); use more training images")
    # The split files go last: a directory holding them holds a whole dataset.
    atomic_write_text(root / "objects.json", json.dumps(
        {"image_size": image_size, "object_size": side, "colors": {c: list(v) for c, v in COLORS.items()},
         "images": scenes}) + "\n")
    for split, lines in rows.items():
        atomic_write_text(root / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    logger.info("wrote %d train / %d test questions over %d images to %s",
                len(rows["train"]), len(rows["test"]), total, root)
    return root


def _check_args(num_train: int, num_test: int, image_size: int, num_objects: int, per_image: int) -> None:
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train_images and num_test_images must be >= 1, got {num_train} and {num_test}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (objects are image_size // 8 wide), got {image_size}")
    if not 2 <= num_objects <= len(COLORS):
        raise ValueError(f"num_objects must be in [2, {len(COLORS)}] (one colour each, and relational "
                         f"questions need a second object), got {num_objects}")
    if per_image < 2:
        raise ValueError(f"questions_per_image must be >= 2 (one of each answer type), got {per_image}")


def _sample_scene(rng: np.random.Generator, image_size: int, side: int, n: int) -> list[SceneObject]:
    colors = rng.choice(len(COLORS), size=n, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=n)
    cell = image_size // _GRID
    start = (image_size - _GRID * cell) // 2  # centre the grid when image_size is not a multiple of it
    for _ in range(_MAX_TRIES):
        cells = rng.choice(_GRID * _GRID, size=n, replace=False)
        corner = start + np.stack([cells % _GRID, cells // _GRID], axis=1) * cell  # (n, 2) x, y
        # Offsets below cell - side keep a one-pixel gap to the next cell.
        centers = corner + rng.integers(0, cell - side, size=(n, 2)) + side / 2  # (n, 2)
        if _unambiguous(centers, _TIE_MARGIN * side):
            names = list(COLORS)
            return [SceneObject(names[c], SHAPES[s], (float(x), float(y)))
                    for c, s, (x, y) in zip(colors, shapes, centers, strict=True)]
    raise RuntimeError(f"no unambiguous layout of {n} objects in {_MAX_TRIES} tries")


def _unambiguous(centers: np.ndarray, margin: float) -> bool:
    """Whether every object's closest and farthest other object beat the runner-up by ``margin``."""
    n = len(centers)
    if n < 3:
        return True
    dist = np.linalg.norm(centers[:, None] - centers[None], axis=-1)  # (n, n)
    others = np.sort(dist[~np.eye(n, dtype=bool)].reshape(n, n - 1), axis=1)  # (n, n - 1)
    closest_clear = others[:, 1] - others[:, 0] >= margin
    farthest_clear = others[:, -1] - others[:, -2] >= margin
    return bool(np.all(closest_clear & farthest_clear))


def _draw(scene: Scene, image_size: int, side: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene:
        x0, y0 = round(o.center[0] - side / 2), round(o.center[1] - side / 2)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)  # Pillow boxes include their last pixel
        (draw.rectangle if o.shape == "square" else draw.ellipse)(box, fill=COLORS[o.color])
    return image


def _by_distance(scene: Scene, k: int) -> list[SceneObject]:
    """The objects other than ``scene[k]``, nearest to it first."""
    kx, ky = scene[k].center
    others = [o for j, o in enumerate(scene) if j != k]
    return sorted(others, key=lambda o: float(np.hypot(o.center[0] - kx, o.center[1] - ky)))


# (template, answer(scene, k, image_size)); ``{c}`` is the colour of object k.
Template = tuple[str, Callable[[Scene, int, int], str]]

_NON_RELATIONAL: tuple[Template, ...] = (
    ("what shape is the {c} object?", lambda s, k, size: s[k].shape),
    ("is the {c} object on the left?", lambda s, k, size: "yes" if s[k].center[0] < size / 2 else "no"),
    ("is the {c} object at the top?", lambda s, k, size: "yes" if s[k].center[1] < size / 2 else "no"),
)
_RELATIONAL: tuple[Template, ...] = (
    ("what shape is the object closest to the {c} object?", lambda s, k, size: _by_distance(s, k)[0].shape),
    ("what shape is the object farthest from the {c} object?",
     lambda s, k, size: _by_distance(s, k)[-1].shape),
    ("what color is the object closest to the {c} object?", lambda s, k, size: _by_distance(s, k)[0].color),
    ("how many objects have the same shape as the {c} object?",
     lambda s, k, size: str(sum(o.shape == s[k].shape for o in s))),
)


def _questions(rng: np.random.Generator, scene: Scene, image_size: int,
               count: int) -> list[tuple[str, str, str]]:
    """``count`` distinct (question, answer, answer_type) triples, half relational."""
    out = []
    for answer_type, templates, n in (("non-relational", _NON_RELATIONAL, count - count // 2),
                                      ("relational", _RELATIONAL, count // 2)):
        pool = [(t, k) for t in templates for k in range(len(scene))]
        for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False):
            (template, answer), k = pool[i]
            out.append((template.format(c=scene[k].color), answer(scene, k, image_size), answer_type))
    return out
