from __future__ import annotations

import pytest
import torch

from mmfuse.data import VQASplit, majority_answer_accuracy


def split(answers: list[str], **overrides) -> VQASplit:
    fields = dict(
        images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
        image_index=torch.tensor([i % 2 for i in range(len(answers))]),
        questions=["q?"] * len(answers),
        answers=answers,
        answer_types=None,
        image_paths=["a.png", "b.png"],
        name="toy/train",
    )
    return VQASplit(**{**fields, **overrides})


def test_len_and_image_size():
    s = split(["yes", "no", "yes"])
    assert len(s) == 3 and s.image_size == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"images": torch.zeros(2, 3, 4, 4)}, "uint8"),
        ({"images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8)}, r"\(M, 3, S, S\)"),
        ({"image_paths": ["a.png"]}, "2 images but 1 image paths"),
        ({"image_index": torch.tensor([0, 1])}, r"image_index must be int64 \(N,\) = \(3,\)"),
        ({"image_index": torch.tensor([0, 1, 2])}, "out of range"),
        ({"questions": ["q?"]}, r"\(N,\) = \(1,\)"),
        ({"answer_types": ["color"]}, "differ in length"),
    ],
)
def test_inconsistent_fields_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        split(["yes", "no", "yes"], **overrides)


def test_majority_answer_accuracy():
    train = split(["no", "yes", "yes", "blue", "no"])  # yes and no tie: alphabetical, "no"
    assert majority_answer_accuracy(train, split(["no", "yes", "red", "no"])) == 0.5
    assert majority_answer_accuracy(split(["yes", "yes", "no"]), split(["no", "no"])) == 0.0
