"""The relational dataset: files, determinism, and answers recomputed from the scenes in objects.json."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmfuse.data import load_split
from mmfuse.data.relational import COLORS, write_relational_dataset

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_relational_dataset(tmp_path_factory.mktemp("rel"), num_train_images=30, num_test_images=10,
                                    image_size=SIZE, seed=0, progress=False)


def _rows(root: Path, split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _objects(root: Path) -> dict[str, Any]:
    return json.loads((root / "objects.json").read_text(encoding="utf-8"))


def _expected(question: str, scene: list[dict[str, Any]], size: int) -> tuple[str, str]:
    """(answer, answer_type) worked out from the scene, independently of the generator."""
    by_color = {o["color"]: o for o in scene}

    def others(c: str) -> list[dict[str, Any]]:
        center = by_color[c]["center"]
        return sorted((o for o in scene if o["color"] != c), key=lambda o: math.dist(o["center"], center))

    patterns = {
        r"what shape is the (\w+) object\?": lambda c: (by_color[c]["shape"], "non-relational"),
        r"is the (\w+) object on the left\?":
            lambda c: ("yes" if by_color[c]["center"][0] < size / 2 else "no", "non-relational"),
        r"is the (\w+) object at the top\?":
            lambda c: ("yes" if by_color[c]["center"][1] < size / 2 else "no", "non-relational"),
        r"what shape is the object closest to the (\w+) object\?":
            lambda c: (others(c)[0]["shape"], "relational"),
        r"what shape is the object farthest from the (\w+) object\?":
            lambda c: (others(c)[-1]["shape"], "relational"),
        r"what color is the object closest to the (\w+) object\?":
            lambda c: (others(c)[0]["color"], "relational"),
        r"how many objects have the same shape as the (\w+) object\?":
            lambda c: (str(sum(o["shape"] == by_color[c]["shape"] for o in scene)), "relational"),
    }
    for pattern, answer in patterns.items():
        if m := re.fullmatch(pattern, question):
            return answer(m.group(1))
    raise AssertionError(f"unknown question {question!r}")


def test_files_load_with_the_right_counts(dataset: Path) -> None:
    assert len(list((dataset / "images").glob("*.png"))) == 40
    assert (dataset / "objects.json").is_file()
    train = load_split(dataset, "train", image_size=SIZE, progress=False)
    test = load_split(dataset, "test", image_size=SIZE, progress=False)
    assert tuple(train.images.shape) == (30, 3, SIZE, SIZE)
    assert tuple(test.images.shape) == (10, 3, SIZE, SIZE)
    assert len(train.questions) == 300 and len(test.questions) == 100  # 10 questions an image
    assert train.answer_types is not None and set(train.answer_types) == {"relational", "non-relational"}
    assert all(re.fullmatch(r"images/\d{5}\.png", r["image"]) for r in _rows(dataset, "train"))  # relative


def test_every_answer_matches_the_scene(dataset: Path) -> None:
    objects = _objects(dataset)
    assert objects["image_size"] == SIZE
    for split in ("train", "test"):
        for row in _rows(dataset, split):
            scene = objects["images"][row["image"]]
            assert (row["answer"], row["answer_type"]) == _expected(row["question"], scene, SIZE), row


def test_questions_are_distinct_and_half_relational(dataset: Path) -> None:
    per_image: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(dataset, "train") + _rows(dataset, "test"):
        per_image.setdefault(row["image"], []).append(row)
    assert len(per_image) == 40
    for rows in per_image.values():
        assert len({r["question"] for r in rows}) == 10
        assert Counter(r["answer_type"] for r in rows) == {"relational": 5, "non-relational": 5}
    templates = {re.sub(r"\b(" + "|".join(COLORS) + r") object", "<c> object", r["question"])
                 for rows in per_image.values() for r in rows}
    assert len(templates) == 7


def test_scenes_are_unambiguous_and_drawn_where_recorded(dataset: Path) -> None:
    objects = _objects(dataset)
    side = objects["object_size"]
    assert side == SIZE // 8
    for name, scene in objects["images"].items():
        assert len(scene) == 4 and len({o["color"] for o in scene}) == 4
        centers = np.array([o["center"] for o in scene])
        dist = np.linalg.norm(centers[:, None] - centers[None], axis=-1) + np.diag([np.inf] * 4)
        assert dist.min() > side  # never overlapping (same-size boxes)
        for i in range(4):
            d = np.sort(np.delete(dist[i], i))
            assert d[1] - d[0] >= side / 2 and d[-1] - d[-2] >= side / 2  # closest / farthest unambiguous
        assert all(abs(c - SIZE / 2) >= side / 2 for o in scene for c in o["center"])  # none across a midline
        pixels = np.asarray(Image.open(dataset / name).convert("RGB"))
        for o in scene:
            x0, y0 = (int(c - side / 2) for c in o["center"])
            box = pixels[y0:y0 + side, x0:x0 + side]  # (side, side, 3)
            assert tuple(pixels[int(o["center"][1]), int(o["center"][0])]) == COLORS[o["color"]]
            corner_is_filled = tuple(box[0, 0]) == COLORS[o["color"]]
            assert corner_is_filled == (o["shape"] == "square"), (name, o)
        painted = (pixels != 255).any(axis=-1).sum()
        assert 4 * side * side * 0.6 < painted <= 4 * side * side  # nothing drawn outside the boxes


def test_test_answers_occur_in_train(dataset: Path) -> None:
    train = {r["answer"] for r in _rows(dataset, "train")}
    assert {r["answer"] for r in _rows(dataset, "test")} <= train
    assert {"square", "circle", "yes", "no"} <= train and set(COLORS) <= train


def test_deterministic_for_a_seed(dataset: Path, tmp_path: Path) -> None:
    kwargs = dict(num_train_images=30, num_test_images=10, image_size=SIZE, progress=False)
    again = write_relational_dataset(tmp_path / "again", seed=0, **kwargs)
    for name in ("train.jsonl", "test.jsonl", "objects.json", "images/00007.png"):
        assert (again / name).read_bytes() == (dataset / name).read_bytes(), name
    other = write_relational_dataset(tmp_path / "other", seed=1, **kwargs)
    assert (other / "train.jsonl").read_bytes() != (dataset / "train.jsonl").read_bytes()


@pytest.mark.parametrize("num_objects", [2, 6])
def test_other_object_counts(tmp_path: Path, num_objects: int) -> None:
    root = write_relational_dataset(tmp_path, num_train_images=12, num_test_images=2, image_size=40,
                                    num_objects=num_objects, seed=3, progress=False)
    scenes = _objects(root)["images"]
    rows = _rows(root, "train") + _rows(root, "test")
    assert all(len(s) == num_objects for s in scenes.values())
    for row in rows:
        expected = _expected(row["question"], scenes[row["image"]], 40)
        assert (row["answer"], row["answer_type"]) == expected, row
    counts = {int(r["answer"]) for r in rows if r["question"].startswith("how many")}
    assert counts and counts <= set(range(1, num_objects + 1))


def test_unseen_test_answer_raises_and_writes_no_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never occur in the training split"):
        write_relational_dataset(tmp_path, num_train_images=1, num_test_images=20, image_size=SIZE,
                                 progress=False)
    assert not (tmp_path / "train.jsonl").exists() and not (tmp_path / "test.jsonl").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_objects": 1}, "num_objects"), ({"num_objects": 7}, "num_objects"),
    ({"image_size": 16}, "image_size"),
    ({"num_train_images": 0}, "num_train_images"), ({"questions_per_image": 1}, "questions_per_image"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_relational_dataset(tmp_path, **kwargs)
    assert not (tmp_path / "images").exists()
