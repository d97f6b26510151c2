"""HFVisionEncoder on tiny random-weight models that the tests build and save (nothing is downloaded)."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HFVisionEncoder needs transformers (mmfuse[hf])")

from mmfuse.encoders.hf_vision import HFVisionEncoder, ImagePreprocess, image_size  # noqa: E402
from mmfuse.io import CheckpointError  # noqa: E402
from tests.tiny_hf import TINY, save_clip_vision, save_convnext, save_dinov2, save_vit  # noqa: E402


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return save_vit(tmp_path_factory.mktemp("vit"))


def images(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("build, tokens, dim", [
    (save_vit, 1 + 16, 32),  # CLS + 4x4 patches
    (save_clip_vision, 1 + 16, 32),
    (save_dinov2, 1 + 16, 32),
    (save_convnext, None, 16),  # a feature map: checked against the model's own map below
])
def test_tokens_of_each_family(tmp_path, build, tokens, dim):
    folder = build(tmp_path)
    enc = HFVisionEncoder(folder)
    size = image_size(folder)
    out = enc(images(2, size))
    assert out.shape[0] == 2 and out.shape[2] == dim == enc.out_dim and out.shape[1] == enc.num_tokens
    if tokens is not None:
        assert out.shape[1] == tokens
    else:  # the feature map's positions, row-major
        with torch.no_grad():
            fmap = enc.model(pixel_values=enc.preprocess(images(2, size))).last_hidden_state  # (B, C, h, w)
        torch.testing.assert_close(out, fmap.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("build, processor", [
    (save_vit, "ViTImageProcessorPil"),
    (save_clip_vision, "CLIPImageProcessorPil"),
    (save_dinov2, "BitImageProcessorPil"),
])
def test_preprocessing_matches_the_folders_processor(tmp_path, build, processor):
    """Given images already at the resize size (the data layer decodes them there), crop and normalisation
    agree with the transformers processor's own output."""
    folder = build(tmp_path)
    pre = ImagePreprocess.from_folder(folder)
    x = images(2, image_size(folder), seed=3)
    reference = getattr(transformers, processor).from_pretrained(folder)
    expected = reference([im for im in x.permute(0, 2, 3, 1).numpy()], return_tensors="np")["pixel_values"]
    torch.testing.assert_close(pre(x), torch.from_numpy(np.asarray(expected)), atol=1e-5, rtol=1e-5)


def test_sizes_read_from_the_processor(tmp_path):
    clip = ImagePreprocess.from_folder(save_clip_vision(tmp_path / "clip"))
    assert clip.resize == (40, 40) and clip.crop == (32, 32) and clip.mode == "bicubic"
    assert clip.mean[0] == pytest.approx(0.48145466)
    convnext = ImagePreprocess.from_folder(save_convnext(tmp_path / "convnext"))
    assert convnext.resize == (36, 36) and convnext.crop == (32, 32)  # 32 / 0.875, then crop 32
    assert image_size(tmp_path / "clip") == 40
    # Another input size is resized to the processor's first.
    assert clip(images(1, 64)).shape == (1, 3, 32, 32)


def test_frozen_by_default_and_out_of_the_state(vit_dir):
    enc = HFVisionEncoder(vit_dir)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.model.modules())
    state = enc.state_dict()
    assert list(state) == ["backbone_fingerprint"] and state["backbone_fingerprint"].shape == (32,)
    # The state loads back into a fresh encoder on the same folder, strictly.
    HFVisionEncoder(vit_dir).load_state_dict(state)


def test_finetune_keeps_the_weights_in_the_state(vit_dir):
    enc = HFVisionEncoder(vit_dir, freeze=False)
    assert all(p.requires_grad for p in enc.parameters())
    assert "backbone_fingerprint" not in enc.state_dict() and len(enc.state_dict()) > 10
    enc(images(2, 32)).sum().backward()
    assert enc.model.embeddings.patch_embeddings.projection.weight.grad is not None


def test_other_weights_in_the_folder_are_detected(tmp_path):
    state = HFVisionEncoder(save_vit(tmp_path / "a", seed=0)).state_dict()
    other = HFVisionEncoder(save_vit(tmp_path / "b", seed=1))
    with pytest.raises(CheckpointError, match="does not hold the weights"):
        other.load_state_dict(state)


def test_two_tower_folder_gives_its_vision_tower(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=dict(TINY, vocab_size=50, max_position_embeddings=16),
                                     vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    enc = HFVisionEncoder(tmp_path)
    assert type(enc.model).__name__ == "CLIPVisionModel"
    assert enc(images(1, 32)).shape == (1, 17, 32)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        HFVisionEncoder(tmp_path)


def test_fingerprint_ignores_heads_the_folder_lacks(tmp_path):
    """A ViT saved without its pooler gets a random one at every load; the fingerprint (of the files) and
    so a saved state stay valid."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, **TINY)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    first, second = HFVisionEncoder(tmp_path), HFVisionEncoder(tmp_path)
    assert not torch.equal(first.model.pooler.dense.weight, second.model.pooler.dense.weight)
    assert torch.equal(first.backbone_fingerprint, second.backbone_fingerprint)
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(first(images(1, 32)), second(images(1, 32)))
