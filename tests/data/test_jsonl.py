from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmfuse.data import DataError, has_split, load_image, load_jsonl_split, load_split


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    """One line per row: dicts as JSON, strings verbatim (for blank and malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def dataset(tmp_path, write_image) -> Path:
    """Four images of different sizes and modes, five train questions, two test questions."""
    root = tmp_path / "shapes"
    write_image(root / "images" / "rgba.png", "RGBA", (30, 20), (255, 0, 0, 255))
    write_image(root / "images" / "grey.png", "L", (64, 64), 90)
    write_image(root / "images" / "palette.png", "P", (7, 90), (0, 0, 255))
    write_image(root / "images" / "deep.png", "I;16", (100, 100), 65535)
    _write_jsonl(root / "train.jsonl", [
        {"image": "images/rgba.png", "question": "What color is the shape?", "answer": "red"},
        {"image": "images/grey.png", "question": "Is there a circle?", "answer": "no", "id": 7},
        "",
        {"image": "./images/../images/rgba.png", "question": "Is there a square?", "answer": "yes"},
        {"image": "images/palette.png", "question": "What color is the shape?", "answer": "blue"},
        "   ",
        {"image": "images/rgba.png", "question": "", "answer": "yes"},
    ])
    _write_jsonl(root / "test.jsonl", [
        {"image": "images/deep.png", "question": "what shape?", "answer": "hexagon", "answer_type": "shape"},
        {"image": "images/grey.png", "question": "is it grey?", "answer": "yes", "answer_type": "yes/no"},
    ])
    return root


def test_happy_path(dataset):
    train = load_jsonl_split(dataset, "train", image_size=16, progress=False)
    assert len(train) == 5 and train.name == "shapes/train"
    assert train.questions[1] == "Is there a circle?" and train.questions[4] == ""
    assert train.answers == ["red", "no", "yes", "blue", "yes"]
    assert train.answer_types is None
    # the same file under two spellings is one image, rows in order of first mention
    assert [Path(p).name for p in train.image_paths] == ["rgba.png", "grey.png", "palette.png"]
    assert train.image_index.tolist() == [0, 1, 0, 2, 0]
    assert train.images.dtype == torch.uint8 and train.images.shape == (3, 3, 16, 16)
    for row, path in enumerate(train.image_paths):
        assert torch.equal(train.images[row], load_image(path, 16))
    assert train.images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert train.images[2, :, 0, 0].tolist() == [0, 0, 255]

    test = load_split(dataset, "test", image_size=16)
    assert test.answer_types == ["shape", "yes/no"]
    assert test.images[0, :, 0, 0].tolist() == [255, 255, 255]  # 16-bit white
    assert test.answers[0] == "hexagon"  # not in train: fine here, the evaluator scores it as wrong


def test_split_files(dataset):
    assert has_split(dataset, "train") and has_split(dataset, "test") and not has_split(dataset, "val")
    with pytest.raises(DataError, match=r"val\.jsonl: split file not found"):
        load_split(dataset, "val")
    (dataset / "val.jsonl").write_text("\n  \n")
    assert has_split(dataset, "val")
    with pytest.raises(DataError, match=r"val\.jsonl: no examples"):
        load_split(dataset, "val")
    with pytest.raises(DataError, match=r"dev\.jsonl: split file not found"):  # any plain name (predict --split)
        load_jsonl_split(dataset, "dev")
    with pytest.raises(ValueError, match="split must be one of"):
        load_jsonl_split(dataset, "../train")


def test_data_that_is_neither_easy_vqa_nor_a_directory(tmp_path):
    with pytest.raises(DataError, match="neither 'easy-vqa' nor a dataset directory"):
        load_split(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="easy-VQA has the splits"):
        load_split("easy-vqa", "val")


GOOD = {"image": "images/rgba.png", "question": "q?", "answer": "red"}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"image": "images/rgba.png", "question": "q?"', "invalid JSON"),
        ('["images/rgba.png", "q?", "red"]', "expected a JSON object, got list"),
        ({"image": "images/rgba.png", "question": "q?"}, "missing key 'answer'"),
        ({**GOOD, "question": 3}, "'question' must be a string, got int"),
        ({**GOOD, "image": None}, "'image' must be a string, got NoneType"),
        ({**GOOD, "answer": ""}, "'answer' is empty"),
        ({**GOOD, "image": "images/nope.png"}, "image file 'images/nope.png' not found"),
        ({**GOOD, "image": "images/corrupt.png"}, "cannot decode image"),
        ({**GOOD, "image": "../outside.png"}, "leads outside the dataset directory"),
        ({**GOOD, "image": "images/../../outside.png"}, "leads outside the dataset directory"),
        ({**GOOD, "image": "/images/rgba.png"}, "must be relative"),
        ({**GOOD, "image": "C:\\images\\rgba.png"}, "must be relative"),
        ({**GOOD, "image": ""}, "'image' is empty"),
    ],
    ids=["json", "not-object", "missing-key", "int-question", "null-image", "empty-answer", "missing-image",
         "corrupt-image", "dotdot", "nested-dotdot", "absolute", "windows-drive", "empty-image"],
)
def test_bad_line_names_file_and_line(dataset, bad_line, message):
    # outside.png exists, so "../outside.png" is rejected for where it is, not for being missing
    (dataset.parent / "outside.png").write_bytes((dataset / "images" / "rgba.png").read_bytes())
    (dataset / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    path = _write_jsonl(dataset / "train.jsonl", [GOOD, "", GOOD, bad_line, GOOD])
    with pytest.raises(DataError, match=message) as info:
        load_jsonl_split(dataset, "train")
    assert f"{path} line 4: " in str(info.value)


def test_mixed_answer_type_reported_where_missing(dataset):
    path = _write_jsonl(dataset / "train.jsonl", [{**GOOD, "answer_type": "color"}, GOOD])
    with pytest.raises(DataError, match=f"{path} line 2: no 'answer_type', but line 1 has one"):
        load_jsonl_split(dataset, "train")
