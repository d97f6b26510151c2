from __future__ import annotations

import json

import pytest

from mmfuse.data import AnswerVocab, WordTokenizer, load_vocab, save_vocab
from mmfuse.io import atomic_path

QUESTIONS = ["What color is the shape?", "Is there a red circle?", "what's the shape?", "is the shape red?"]


def test_answer_vocab_sorted_unique_and_unknown_is_minus_one():
    vocab = AnswerVocab(["yes", "no", "blue", "yes", "no"])
    assert vocab.names == ["blue", "no", "yes"] and len(vocab) == 3
    assert [vocab.index(a) for a in ["blue", "no", "yes", "purple"]] == [0, 1, 2, -1]
    assert "yes" in vocab and "purple" not in vocab
    # from_dict keeps the saved class order as it is, whatever it is
    kept = AnswerVocab.from_dict({"names": ["yes", "blue"]})
    assert kept.names == ["yes", "blue"] and kept.index("blue") == 1
    with pytest.raises(ValueError, match="unique"):
        AnswerVocab.from_dict({"names": ["a", "a"]})
    with pytest.raises(ValueError, match="at least one"):
        AnswerVocab([])


def test_vocab_json_round_trip(tmp_path):
    tok = WordTokenizer.fit(QUESTIONS)
    answers = AnswerVocab(["yes", "no", "red"])
    path = tmp_path / "vocab.json"
    save_vocab(path, tok.to_dict(), answers)
    assert json.loads(path.read_text())["answers"] == ["no", "red", "yes"]  # plain JSON
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left behind

    tokenizer_dict, names = load_vocab(path)
    assert WordTokenizer.from_dict(tokenizer_dict).to_dict() == tok.to_dict()
    assert AnswerVocab.from_dict({"names": names}).names == answers.names

    save_vocab(path, tok.to_dict(), ["b", "a"])  # a plain list is written in its own order
    assert load_vocab(path)[1] == ["b", "a"]


def test_load_vocab_rejects_other_files(tmp_path):
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text("{")
    for name in ["other.json", "broken.json", "missing.json"]:
        with pytest.raises(ValueError, match=name):
            load_vocab(tmp_path / name)


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "vocab.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["vocab.json"]


def test_the_tokenizer_is_still_importable_from_the_data_package():
    from mmfuse.data.vocab import CLS
    from mmfuse.encoders import WordTokenizer as EncoderTokenizer
    from mmfuse.encoders.tokenizer import CLS as ENCODER_CLS

    assert WordTokenizer is EncoderTokenizer and CLS == ENCODER_CLS
