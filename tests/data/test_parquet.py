"""Parquet splits: image bytes, relative paths and datasets-style structs, answer lists, row-numbered errors."""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
import torch
from PIL import Image

from mmfuse.cli import main
from mmfuse.data import DataError, load_image, load_split
from tests.tiny_data import make_tiny_dataset

pa = pytest.importorskip("pyarrow", reason="Parquet splits need pyarrow (mmfuse[parquet])")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def rows_of(root, split):
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def write(path, columns, row_group_size=4):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


@pytest.mark.parametrize("form", ["bytes", "path", "struct"])
def test_same_split_as_jsonl(tiny, tmp_path, form):
    rows = rows_of(tiny, "train")
    cells = {
        "bytes": [(tiny / r["image"]).read_bytes() for r in rows],
        "path": [r["image"] for r in rows],
        "struct": [{"bytes": (tiny / r["image"]).read_bytes(), "path": None} for r in rows],
    }[form]
    root = tmp_path / "pq"
    (root / "images").mkdir(parents=True)
    for r in rows:
        (root / r["image"]).write_bytes((tiny / r["image"]).read_bytes())
    write(root / "train.parquet", {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
                                   "image": cells, "answer_type": [r["answer_type"] for r in rows]})
    got, expected = load_split(root, "train", image_size=32), load_split(tiny, "train", image_size=32)
    assert got.questions == expected.questions and got.answers == expected.answers
    assert got.answer_types == expected.answer_types
    # Each question sees the same pixels (images with identical bytes are decoded once, so rows may differ).
    assert torch.equal(got.images[got.image_index], expected.images[expected.image_index])
    assert len(got.images) == (len(expected.images) if form == "path" else len({c if isinstance(c, bytes) else
                                                                                   c["bytes"] for c in cells}))


def test_answer_lists_train_on_the_most_common_and_score_vqa_accuracy(tiny, tmp_path, capsys):
    root = tmp_path / "vqa"
    root.mkdir()
    for split in ("train", "test"):
        rows = rows_of(tiny, split)
        # Three annotators agree, one says "maybe" (a wrong-but-given answer), for every question.
        answers = [[r["answer"], "maybe", r["answer"], r["answer"]] for r in rows]
        if split == "test":  # only two annotators agree on the first question: VQA accuracy 2/3 there
            answers[0] = [rows[0]["answer"], rows[0]["answer"], "maybe", "other"]
        write(root / f"{split}.parquet", {"question": [r["question"] for r in rows], "answers": answers,
                                          "image": [(tiny / r["image"]).read_bytes() for r in rows]})
    train = load_split(root, "train", image_size=32)
    assert train.answers == [r["answer"] for r in rows_of(tiny, "train")] and "maybe" not in train.answers
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), "--epochs", "1", "--image-size", "32", "--dim",
                 "16", "--num-heads", "2", "--images-per-batch", "4", "--threads", "1", "--no-progress"]) == 0
    capsys.readouterr()
    predictions = tmp_path / "pred.jsonl"
    assert main(["evaluate", "--checkpoint", str(run), "--json", "--predictions", str(predictions)]) == 0
    summary = json.loads(capsys.readouterr().out)
    test = load_split(root, "test", image_size=32)
    predicted = [json.loads(line)["prediction"] for line in predictions.read_text().splitlines()]
    expected = sum(min(a.count(p) / 3, 1) for a, p in zip(test.answer_lists, predicted, strict=True)) / len(test)
    assert summary["vqa_accuracy"] == pytest.approx(expected)


def test_errors_name_file_and_row(tiny, tmp_path):
    rows = rows_of(tiny, "train")[:6]
    good = [(tiny / r["image"]).read_bytes() for r in rows]
    base = {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}

    write(tmp_path / "train.parquet", {**base, "image": [*good[:4], b"not an image", good[5]]})
    with pytest.raises(DataError, match=r"train\.parquet row 4: cannot decode image"):
        load_split(tmp_path, "train")
    shutil.copytree(tiny / "images", tmp_path / "images")
    write(tmp_path / "train.parquet", {**base, "image": [r["image"] for r in rows[:5]] + ["../escape.png"]})
    with pytest.raises(DataError, match=r"train\.parquet row 5: image path '\.\./escape\.png' leads outside"):
        load_split(tmp_path, "train")
    write(tmp_path / "train.parquet", {"question": base["question"], "image": good})
    with pytest.raises(DataError, match=r"train\.parquet: no column 'answer' or 'answers'"):
        load_split(tmp_path, "train")
    write(tmp_path / "train.parquet", {**base, "answer": [*base["answer"][:2], "", *base["answer"][3:]],
                                       "image": good})
    with pytest.raises(DataError, match=r"train\.parquet row 2: 'answer' must be a non-empty string"):
        load_split(tmp_path, "train")


def test_identical_image_bytes_decode_once(tiny, tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(png, format="PNG")
    write(tmp_path / "test.parquet", {"question": ["a", "b", "c"], "answer": ["x", "y", "x"],
                                      "image": [png.getvalue()] * 2 + [(tiny / "images/0001.png").read_bytes()]})
    split = load_split(tmp_path, "test", image_size=16)
    assert split.images.shape == (2, 3, 16, 16) and split.image_index.tolist() == [0, 0, 1]
    assert torch.equal(split.images[1], load_image(tiny / "images/0001.png", 16))


def test_disk_storage_builds_once_and_matches_memory(tiny, tmp_path, monkeypatch, caplog):
    rows = rows_of(tiny, "train")
    write(tmp_path / "train.parquet", {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
                                       "image": [(tiny / r["image"]).read_bytes() for r in rows]})
    memory = load_split(tmp_path, "train", image_size=16)
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    disk = load_split(tmp_path, "train", image_size=16, storage="disk")
    assert hasattr(disk.images, "disk_rows") and torch.equal(disk.images, memory.images)
    with caplog.at_level(logging.INFO, logger="mmfuse.data.storage"):
        again = load_split(tmp_path, "train", image_size=16, storage="disk")
    assert "image cache: reused" in caplog.text and torch.equal(again.images, memory.images)
