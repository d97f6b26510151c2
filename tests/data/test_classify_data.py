from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from mmfuse.data import DataError
from mmfuse.data.classify import load_classify_split
from mmfuse.data.context_shapes import SHAPES, write_context_dataset


def _write(root: Path, lines: list[object], split: str = "train") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (10, 10), (200, 10, 10)).save(root / name)
    (root / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.mark.parametrize("context", ["text", "image"])
def test_context_dataset_labels_depend_on_the_context(tmp_path, context):
    root = write_context_dataset(tmp_path / "d", num_train_images=6, num_test_images=2, image_size=32,
                                 num_objects=3, context=context, seed=1)
    split = load_classify_split(root, "train", image_size=32)
    assert split.context == context
    assert len(split) == 6 * 3 and split.images.shape == (6, 3, 32, 32)
    labels_of: dict[int, list[str]] = defaultdict(list)
    contexts_of: dict[int, set[object]] = defaultdict(set)
    for i, label in enumerate(split.labels):
        m = int(split.image_index[i])
        labels_of[m].append(label)
        contexts_of[m].add(split.contexts[i] if context == "text" else int(split.context_index[i]))
    for m in range(6):
        # the same image, once per object: as many different labels as contexts, so the image alone
        # cannot tell which label is asked for
        assert len(set(labels_of[m])) == 3 == len(contexts_of[m])
        assert set(labels_of[m]) <= set(SHAPES)
    if context == "image":  # a context image shows one colour and no shape
        flat = split.context_images.flatten(2)  # (K, 3, S*S)
        assert bool((flat == flat[:, :, :1]).all())
    test = load_classify_split(root, "test", image_size=32)
    assert len(test) == 2 * 3


def test_context_dataset_is_deterministic(tmp_path):
    a = write_context_dataset(tmp_path / "a", num_train_images=3, num_test_images=1, image_size=32, seed=5)
    b = write_context_dataset(tmp_path / "b", num_train_images=3, num_test_images=1, image_size=32, seed=5)
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()
    assert (a / "images" / "00000.png").read_bytes() == (b / "images" / "00000.png").read_bytes()


def test_plain_lines_and_shared_images(tmp_path):
    root = _write(tmp_path, [{"image": "a.png", "label": "x"}, {"image": "b.png", "label": "y"},
                             {"image": "a.png", "label": "z"}])
    split = load_classify_split(root, "train", image_size=8)
    assert split.context == "none" and split.labels == ["x", "y", "z"]
    assert split.image_index.tolist() == [0, 1, 0] and split.images.shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([{"image": "a.png"}], r"train.jsonl line 1: missing key 'label'"),
        ([{"image": "a.png", "label": ""}], r"line 1: 'label' is empty"),
        ([{"image": "a.png", "label": "x"}, {"image": "a.png", "label": 3}], r"line 2: 'label' must be a string"),
        ([{"image": "a.png", "label": "x", "context": "c", "context_image": "b.png"}], r"line 1: .*not both"),
        ([{"image": "a.png", "label": "x", "context": "c"}, {"image": "a.png", "label": "y"}],
         r"line 2: context 'none', but line 1 has 'text'"),
        ([{"image": "a.png", "label": "x", "context_image": "../b.png"}], r"line 1: .*outside the dataset"),
        ([{"image": "nope.png", "label": "x"}], r"line 1: .*not found"),
    ],
)
def test_errors_name_file_and_line(tmp_path, lines, match):
    root = _write(tmp_path / "d", lines)
    with pytest.raises(DataError, match=match):
        load_classify_split(root, "train", image_size=8)


def test_undecodable_image_names_the_line(tmp_path):
    root = _write(tmp_path / "d", [{"image": "a.png", "label": "x"}, {"image": "bad.png", "label": "y"}])
    (root / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"train.jsonl line 2: .*bad.png: cannot decode"):
        load_classify_split(root, "train", image_size=8)


def test_missing_split_file(tmp_path):
    root = _write(tmp_path / "d", [{"image": "a.png", "label": "x"}])
    with pytest.raises(DataError, match=r"test\.jsonl: split file not found"):
        load_classify_split(root, "test")


def test_position_labels_name_the_quadrant_of_the_named_colour(tmp_path):
    import torch

    from mmfuse.data.context_shapes import COLORS, QUADRANTS

    root = write_context_dataset(tmp_path / "p", num_train_images=5, num_test_images=1, image_size=48,
                                 num_objects=4, label="position", seed=3)
    split = load_classify_split(root, "train", image_size=48)  # native size: colours are exact
    assert set(split.labels) <= set(QUADRANTS)
    for i, (context, label) in enumerate(zip(split.contexts, split.labels, strict=True)):
        rgb = torch.tensor(COLORS[context.split()[1]], dtype=torch.uint8)[:, None, None]
        ys, xs = torch.nonzero((split.images[int(split.image_index[i])] == rgb).all(0), as_tuple=True)
        assert len(ys) > 0, context
        row, col = int(ys.float().mean() >= 24), int(xs.float().mean() >= 24)
        assert QUADRANTS[2 * row + col] == label
