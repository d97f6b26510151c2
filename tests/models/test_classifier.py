from __future__ import annotations

import json

import pytest
import torch

from mmfuse.data.vocab import AnswerVocab, WordTokenizer
from mmfuse.io import CheckpointError
from mmfuse.models import PretrainedModel
from mmfuse.models.classifier import ImageClassifier, ImageClassifierConfig

pytestmark = pytest.mark.usefixtures("single_thread")

LABELS = AnswerVocab(["circle", "cross", "square"])
TOKENIZER = WordTokenizer.fit(["the red object", "the blue object"])
SMALL = {"width": 0.125, "num_heads": 2, "context_dim": 16, "image_size": 32, "dropout": 0.0, "attn_dropout": 0.0}


def _model(**kw) -> ImageClassifier:
    cfg = ImageClassifierConfig(num_classes=3, **{**SMALL, **kw})
    return ImageClassifier(cfg, labels=LABELS, tokenizer=TOKENIZER if cfg.context == "text" else None)


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_text_context_changes_the_logits_and_round_trips(tmp_path):
    model = _model(context="text", vocab_size=len(TOKENIZER), levels=(2, 3, 4, 5)).eval()
    images = _images()
    ids, mask = model.tokenize(["the red object", "the blue object"])
    logits, weights = model(images, ids, mask, need_weights=True)
    assert logits.shape == (2, 3)
    assert sorted(weights) == [2, 3, 4, 5]
    for level, w in weights.items():
        assert w.shape == (2, 2, (32 >> level) ** 2, ids.shape[1])
    swapped = model(images, ids.flip(0), mask.flip(0))
    assert not torch.allclose(logits, swapped)  # the context is read
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "image_classifier"
    loaded = PretrainedModel.from_pretrained(tmp_path)
    assert isinstance(loaded, ImageClassifier) and loaded.labels.names == LABELS.names
    torch.testing.assert_close(loaded(images, *loaded.tokenize(["the red object", "the blue object"])), logits)


def test_image_context_and_backward():
    model = _model(context="image", levels=(3, 5))
    logits = model(_images(), context_images=_images())
    logits.sum().backward()
    assert model.context_encoder.blocks[0][0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="context_images"):
        model(_images())


def test_plain_and_resnet_models_ignore_no_context():
    for model in (_model(context="none"), _model(backbone="resnet18")):
        assert model(_images()).shape == (2, 3)
        assert not any("attn" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "resnet18", "context": "text", "vocab_size": 8}, "baseline without context"),
        ({"backbone": "vgg19"}, "backbone"),
        ({"context": "audio"}, "context"),
        ({"context": "text", "vocab_size": 0}, "vocab_size"),
        ({"context": "image", "levels": (1,)}, "levels"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(**kwargs)


def test_missing_vocab_is_a_checkpoint_error(tmp_path):
    _model(context="none").save_pretrained(tmp_path)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"vocab\.json"):
        PretrainedModel.from_pretrained(tmp_path)
