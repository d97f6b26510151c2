"""Accuracy per question kind: the JSONL loader keeps ``kind``, the evaluation summary reports it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmfuse.data import DataError, VQASplit, load_jsonl_split
from mmfuse.evaluate import EvalResult


def _split(kinds: list[str] | None) -> VQASplit:
    return VQASplit(images=torch.zeros(1, 3, 4, 4, dtype=torch.uint8), image_index=torch.zeros(5, dtype=torch.long),
                    questions=["q"] * 5, answers=["a", "b", "a", "b", "a"], answer_types=None, image_paths=["x.png"],
                    name="t", kinds=kinds)


def test_summary_reports_accuracy_per_kind():
    kinds = ["relational", "relational", "non-relational", "non-relational", "non-relational"]
    targets = torch.tensor([0, 1, 0, 1, 0])
    predictions = torch.tensor([0, 0, 0, 1, 1])  # relational 1/2, non-relational 2/3
    summary = EvalResult(_split(kinds), ["a", "b"], targets, predictions, torch.ones(5)).summary()
    assert summary["accuracy_by_kind"] == pytest.approx({"relational": 0.5, "non-relational": 2 / 3})
    assert summary["accuracy"] == pytest.approx(0.6)
    assert set(summary["accuracy_by_answer"]) == {"a", "b"}  # the answer grouping is kept beside it
    plain = EvalResult(_split(None), ["a", "b"], targets, predictions, torch.ones(5)).summary()
    assert "accuracy_by_kind" not in plain


def test_first_images_keeps_kinds_and_lengths_are_checked():
    split = _split(["r", "n", "r", "n", "r"])
    assert split.first_images(1).kinds == ["r", "n", "r", "n", "r"]
    with pytest.raises(ValueError, match="2 kinds for 5 questions"):
        _split(["r", "n"])


def test_loader_keeps_kind_and_rejects_it_on_some_lines_only(tmp_path: Path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "q1", "answer": "x", "kind": "relational"},
            {"image": "a.png", "question": "q2", "answer": "y", "kind": "non-relational"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_jsonl_split(tmp_path, "test", image_size=8, progress=False).kinds == ["relational", "non-relational"]
    del rows[1]["kind"]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="line 2: no 'kind', but line 1 has one"):
        load_jsonl_split(tmp_path, "test", image_size=8, progress=False)
    rows[1]["kind"] = 3
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="'kind' must be a string, got int"):
        load_jsonl_split(tmp_path, "test", image_size=8, progress=False)
