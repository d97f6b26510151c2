"""The frozen-feature cache: tokens computed once, keyed by backbone + preprocessing + images, reused."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mmfuse.cli import main
from mmfuse.data import load_split
from mmfuse.models import VQAModel
from tests.tiny_data import make_tiny_dataset

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from mmfuse.data.feature_cache import cached_image_tokens  # noqa: E402
from mmfuse.encoders.hf_vision import HFVisionEncoder  # noqa: E402
from tests.tiny_hf import save_vit  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return save_vit(tmp_path_factory.mktemp("vit"))


class Counting(HFVisionEncoder):
    calls = 0

    def forward(self, images):
        Counting.calls += images.shape[0]
        return super().forward(images)


def test_computed_once_then_reused(tiny, vit_dir, tmp_path, caplog):
    split = load_split(tiny, "train", image_size=32)
    enc = Counting(vit_dir)
    Counting.calls = 0
    first = cached_image_tokens(enc, split, cache_dir=tmp_path)
    with torch.no_grad():
        expected = enc(split.images)
    assert first.has_features and torch.equal(first.images, expected)  # the backbone's own numbers
    assert first.questions == split.questions and torch.equal(first.image_index, split.image_index)
    files = list((tmp_path / "features").glob("*.npy"))
    assert len(files) == 1

    fresh = Counting(vit_dir)
    Counting.calls = 0
    with caplog.at_level(logging.INFO, logger="mmfuse.data.feature_cache"):
        again = cached_image_tokens(fresh, split, cache_dir=tmp_path)
    assert Counting.calls == 0, "a reused cache runs no backbone"
    assert f"feature cache: reused {len(split.images)} images from {files[0]}" in caplog.text
    assert torch.equal(again.images, expected)


def test_key_changes_with_images_weights_and_preprocessing(tiny, vit_dir, tmp_path):
    split = load_split(tiny, "train", image_size=32)
    cached_image_tokens(HFVisionEncoder(vit_dir), split, cache_dir=tmp_path)
    cached_image_tokens(HFVisionEncoder(vit_dir), split.first_images(4), cache_dir=tmp_path)  # other images
    other = save_vit(tmp_path / "other", seed=1)
    cached_image_tokens(HFVisionEncoder(other), split, cache_dir=tmp_path)  # other weights
    (other / "preprocessor_config.json").write_text(
        (other / "preprocessor_config.json").read_text().replace('"image_std": [\n    0.5', '"image_std": [\n    0.4'))
    assert HFVisionEncoder(other).preprocess.std[0] == 0.4
    cached_image_tokens(HFVisionEncoder(other), split, cache_dir=tmp_path)  # other preprocessing
    assert len(list((tmp_path / "features").glob("*.npy"))) == 4


def test_disabled_by_environment(tiny, vit_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSE_FEATURE_CACHE", "0")
    split = load_split(tiny, "test", image_size=32)
    out = cached_image_tokens(HFVisionEncoder(vit_dir), split, cache_dir=tmp_path)
    assert out.has_features and not (tmp_path / "features").exists()


def test_training_with_a_frozen_backbone_uses_the_cache(tiny, vit_dir, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    args = ["train", "--data", str(tiny), "--vision", f"hf:{vit_dir}", "--dim", "16", "--num-heads", "2",
            "--images-per-batch", "4", "--threads", "1", "--no-progress", "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 2  # train and test
    with caplog.at_level(logging.INFO, logger="mmfuse.data.feature_cache"):
        assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert caplog.text.count("feature cache: reused") == 2
    model = VQAModel.from_pretrained(tmp_path / "b")
    assert model.config.image_size == 32  # read from the folder's processor
    # The run's predictions from raw images (no cache) score what its evaluation with the cache scored.
    capsys.readouterr()
    monkeypatch.setenv("MMFUSE_FEATURE_CACHE", "0")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "b"), "--json"]) == 0
    no_cache = capsys.readouterr().out
    monkeypatch.setenv("MMFUSE_FEATURE_CACHE", "1")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "b"), "--json"]) == 0
    assert capsys.readouterr().out == no_cache
    test = load_split(tiny, "test", image_size=32)
    ids, mask = model.tokenize(test.questions)
    with torch.no_grad():
        raw = model(test.images, ids, mask, test.image_index).argmax(-1)
    answers = [model.answers.names[i] for i in raw.tolist()]

    accuracy = sum(a == b for a, b in zip(answers, test.answers, strict=True)) / len(test)
    assert json.loads(no_cache)["accuracy"] == pytest.approx(accuracy)
