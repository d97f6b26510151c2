"""``mmfuse predict --data DIR --split NAME``: every line of an unlabelled split answered in batches."""

from __future__ import annotations

import json
import logging

import pytest

from mmfuse.cli import main
from mmfuse.data import DataError, load_split
from mmfuse.models import VQAModel
from tests.tiny_data import make_tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_tiny_dataset(tmp_path_factory.mktemp("tiny"))
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--image-size", "32", "--dim",
                 "16", "--num-heads", "2", "--images-per-batch", "4", "--threads", "1", "--no-progress"]) == 0
    return data, out


def test_unlabelled_split_is_answered_line_by_line(run, tmp_path, caplog, capsys):
    data, out = run
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    questions = [r["question"] for r in rows]
    questions[1] = "what hue is the blob?"  # two words training never saw
    questions[4] = "what hue is it?"
    lines = [json.dumps({"image": r["image"], "question": q}) for r, q in zip(rows, questions, strict=True)]
    (data / "unlabelled.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 1: missing key 'answer'"):
        load_split(data, "unlabelled")  # training still needs answers

    predictions = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="mmfuse"):
        assert main(["predict", "--checkpoint", str(out), "--data", str(data), "--split", "unlabelled",
                     "--predictions", str(predictions)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "never seen" in r.getMessage()]
    assert len(warnings) == 1 and "'hue'" in warnings[0] and "'blob'" in warnings[0] and warnings[0].startswith("2 ")
    got = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [g["question"] for g in got] == questions
    assert all("answer" not in g and "correct" not in g for g in got)
    # The same answers, question by question, as the labelled test split's evaluation gives.
    labelled = tmp_path / "labelled.jsonl"
    assert main(["evaluate", "--checkpoint", str(out), "--predictions", str(labelled)]) == 0
    expected = [json.loads(line) for line in labelled.read_text().splitlines()]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g["image"] == e["image"]
        if i not in (1, 4):
            assert g["prediction"] == e["prediction"] and g["probability"] == pytest.approx(e["probability"])
    model = VQAModel.from_pretrained(out)
    assert {g["prediction"] for g in got} <= set(model.answers.names)


def test_predict_needs_its_inputs(run, capsys):
    data, out = run
    for args in (["--question", "what shape is it?"], ["--data", str(data)]):
        with pytest.raises(SystemExit) as info:
            main(["predict", "--checkpoint", str(out), *args])
        assert info.value.code == 2
    assert "is a VQA model: pass --image and --question" in capsys.readouterr().err
