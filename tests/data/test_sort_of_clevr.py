"""Sort-of-CLEVR: answers recomputed from the recorded scenes, the drawing, the question mix, determinism."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfuse.data import load_jsonl_split
from mmfuse.data.sort_of_clevr import PAPER_COLORS, write_sort_of_clevr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sort_of_clevr(tmp_path_factory.mktemp("soc") / "data", num_train_images=12, num_test_images=4,
                               seed=3, progress=False)


def _lines(root: Path, split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def _expected(objects: list[dict], question: str, size: int) -> tuple[str, str]:
    """(answer, kind) from the object list alone, by brute force over the paper's question forms."""
    by_color = {o["color"]: o for o in objects}
    named = next(c for c in by_color if f" {c} object" in question)
    me = by_color[named]
    others = [o for o in objects if o is not me]
    dist = [math.dist(me["center"], o["center"]) for o in others]
    if question.startswith("what shape is the object closest"):
        return others[int(np.argmin(dist))]["shape"], "relational"
    if question.startswith("what shape is the object furthest"):
        return others[int(np.argmax(dist))]["shape"], "relational"
    if question.startswith("how many objects"):
        return str(sum(o["shape"] == me["shape"] for o in others)), "relational"
    if question.startswith("what shape is the"):
        return me["shape"], "non-relational"
    if "left or on the right" in question:
        return ("left" if me["center"][0] < size / 2 else "right"), "non-relational"
    if "top or at the bottom" in question:
        return ("top" if me["center"][1] < size / 2 else "bottom"), "non-relational"
    raise AssertionError(f"unexpected question {question!r}")


def test_every_answer_and_kind_matches_the_scene(dataset: Path) -> None:
    truth = json.loads((dataset / "objects.json").read_text())
    assert truth["image_size"] == 75 and truth["object_radius"] == 5
    answers = Counter()
    for split in ("train", "test"):
        for row in _lines(dataset, split):
            assert (row["answer"], row["kind"]) == _expected(truth["images"][row["image"]], row["question"], 75)
            answers[row["answer"]] += 1
    # every answer form occurs (a generator stuck on one answer would pass the check above)
    assert {"square", "circle", "left", "right", "top", "bottom"} <= set(answers)
    assert len({a for a in answers if a.isdigit()}) >= 3


def test_ten_distinct_questions_of_each_kind_per_image(dataset: Path) -> None:
    rows = _lines(dataset, "train") + _lines(dataset, "test")
    per_image: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        per_image.setdefault(r["image"], []).append(r)
    assert len(per_image) == 16
    for qs in per_image.values():
        assert Counter(r["kind"] for r in qs) == {"relational": 10, "non-relational": 10}
        assert len({r["question"] for r in qs}) == 20


def test_six_distinct_colours_drawn_apart_where_recorded(dataset: Path) -> None:
    truth = json.loads((dataset / "objects.json").read_text())
    r = truth["object_radius"]
    for name, objects in truth["images"].items():
        assert sorted(o["color"] for o in objects) == sorted(PAPER_COLORS)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:  # the squares of side 2r keep at least a pixel apart
                assert max(abs(a["center"][0] - b["center"][0]), abs(a["center"][1] - b["center"][1])) >= 2 * r + 1
        pixels = np.asarray(Image.open(dataset / name).convert("RGB"))
        assert pixels.shape == (75, 75, 3)
        for o in objects:
            x, y = o["center"]
            box = pixels[y - r:y + r, x - r:x + r].reshape(-1, 3)  # (4 r^2, 3)
            colour = np.array(PAPER_COLORS[o["color"]])
            filled = (box == colour).all(axis=1)
            # only the object's own colour (and white corners for a circle) inside its square
            assert ((box == 255).all(axis=1) | filled).all()
            assert filled.all() == (o["shape"] == "square")
            assert filled.mean() > 0.6
        # nothing drawn outside the recorded squares
        outside = np.ones((75, 75), dtype=bool)
        for o in objects:
            x, y = o["center"]
            outside[y - r:y + r, x - r:x + r] = False
        assert (pixels[outside] == 255).all()


def test_deterministic_for_a_seed(dataset: Path, tmp_path: Path) -> None:
    again = write_sort_of_clevr(tmp_path / "again", num_train_images=12, num_test_images=4, seed=3, progress=False)
    other = write_sort_of_clevr(tmp_path / "other", num_train_images=12, num_test_images=4, seed=4, progress=False)
    for f in ("train.jsonl", "test.jsonl", "objects.json", "images/00000.png", "images/00015.png"):
        assert (again / f).read_bytes() == (dataset / f).read_bytes()
    assert (other / "train.jsonl").read_bytes() != (dataset / "train.jsonl").read_bytes()


def test_other_sizes_and_the_loader_keeps_kinds(tmp_path: Path) -> None:
    root = write_sort_of_clevr(tmp_path / "big", num_train_images=3, num_test_images=2, image_size=128,
                               object_radius=9, questions_per_kind=4, seed=0, progress=False)
    truth = json.loads((root / "objects.json").read_text())
    for row in _lines(root, "train"):
        assert row["answer"] == _expected(truth["images"][row["image"]], row["question"], 128)[0]
    split = load_jsonl_split(root, "test", image_size=32, progress=False)
    assert split.kinds == [r["kind"] for r in _lines(root, "test")]
    assert Counter(split.kinds) == {"relational": 8, "non-relational": 8}
    assert Image.open(root / "images/00000.png").size == (128, 128)


def test_background_changes_the_pixels_behind_the_objects_only(dataset: Path, tmp_path: Path) -> None:
    dark = write_sort_of_clevr(tmp_path / "dark", num_train_images=12, num_test_images=4, seed=3,
                               background=(10, 20, 30), progress=False)
    assert (dark / "train.jsonl").read_bytes() == (dataset / "train.jsonl").read_bytes()  # same scenes, questions
    assert json.loads((dark / "objects.json").read_text())["background"] == [10, 20, 30]
    white = np.asarray(Image.open(dataset / "images/00000.png").convert("RGB"))
    pixels = np.asarray(Image.open(dark / "images/00000.png").convert("RGB"))
    behind = (white == 255).all(axis=-1)
    assert (pixels[behind] == [10, 20, 30]).all() and (pixels[~behind] == white[~behind]).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_train_images": 0}, "num_train_images"),
    ({"object_radius": 1}, "object_radius must be >= 2"),
    ({"image_size": 40}, r"image_size must be >= 4 .* = 44"),
    ({"questions_per_kind": 19}, r"questions_per_kind must be in \[1, 18\]"),
    ({"background": (0, 0, 256)}, r"background must be three integers in \[0, 255\]"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_sort_of_clevr(tmp_path / "x", **kwargs)
