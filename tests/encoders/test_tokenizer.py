"""The word tokenizer of the transformer text encoder."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mmfuse.encoders.tokenizer import CLS, PAD, SPECIAL_TOKENS, UNK, WordTokenizer

QUESTIONS = ["What color is the shape?", "Is there a red circle?", "what's the shape?", "is the shape red?"]


def test_tokenize_lowercases_and_splits_punctuation():
    tokens = WordTokenizer.tokenize("What's the RED shape?!")
    assert tokens == ["what", "'", "s", "the", "red", "shape", "?", "!"]
    assert WordTokenizer.tokenize("   ") == []


def test_fit_puts_specials_first_then_words_by_frequency():
    tok = WordTokenizer.fit(QUESTIONS)
    vocab = tok.to_dict()["vocab"]
    assert tuple(vocab[:3]) == SPECIAL_TOKENS == ("<pad>", "<unk>", "<cls>")
    assert vocab[3:7] == ["?", "is", "shape", "the"]  # seen 4, 3, 3, 3 times: by count, ties A-Z
    assert len(tok) == len(vocab) == 3 + 12
    assert WordTokenizer.fit(QUESTIONS, min_freq=2).to_dict()["vocab"][3:] == ["?", "is", "shape", "the",
                                                                               "red", "what"]


def test_encode_shapes_cls_padding_and_round_trip():
    tok = WordTokenizer.fit(QUESTIONS)
    ids, mask = tok.encode(QUESTIONS)
    lengths = [1 + len(WordTokenizer.tokenize(q)) for q in QUESTIONS]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (4, max(lengths))
    assert (ids[:, 0] == CLS).all()
    assert mask.sum(1).tolist() == lengths
    assert ((ids == PAD) == ~mask).all()
    decoded = [tok.decode(row.tolist()) for row in ids]
    assert decoded == [" ".join(WordTokenizer.tokenize(q)) for q in QUESTIONS]


def test_unknown_words_map_to_unk():
    tok = WordTokenizer.fit(QUESTIONS)
    ids, mask = tok.encode(["Is there a purple hexagon?"])
    assert tok.decode(ids[0].tolist()) == "is there a <unk> <unk> ?"
    assert ids[0].tolist().count(UNK) == 2 and mask.all()


def test_empty_question_is_just_cls():
    tok = WordTokenizer.fit(QUESTIONS)
    ids, mask = tok.encode(["", "red"])
    assert ids.tolist() == [[CLS, PAD], [CLS, tok.encode(["red"])[0][0, 1].item()]]
    assert mask.tolist() == [[True, False], [True, True]]
    ids, mask = tok.encode([])
    assert ids.shape == mask.shape == (0, 1)


def test_truncation_warns_once_with_the_count(caplog):
    tok = WordTokenizer.fit(QUESTIONS)
    with caplog.at_level(logging.WARNING, logger="mmfuse.encoders.tokenizer"):
        ids, mask = tok.encode(["red", "is the shape red ?", "what color is the shape ?"], max_length=4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 3" in warnings[0].getMessage()
    assert ids.shape == (3, 4) and mask.sum(1).tolist() == [2, 4, 4]
    assert tok.decode(ids[1].tolist()) == "is the shape"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmfuse.encoders.tokenizer"):
        tok.encode(["is the shape red"], max_length=5)  # exactly fits: <cls> + 4
    assert not caplog.records
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(["red"], max_length=0)


def test_tokenizer_dict_round_trip_through_json():
    tok = WordTokenizer.fit(QUESTIONS)
    again = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    probe = [*QUESTIONS, "an unseen question?"]
    for a, b in zip(tok.encode(probe), again.encode(probe), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer(["red", "blue"])
