import json

import pytest
import torch

from mmfuse.attention import AttentionConfig
from mmfuse.io import CheckpointError
from mmfuse.layers.cross_attention import CrossAttention
from mmfuse.models.vgg import VGGCrossAttention, VGGCrossAttentionConfig

B, NC, CTX = 2, 5, 12
SMALL = {"width": 0.125, "num_heads": 4, "image_size": 32}


def _context(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, NC, CTX, generator=g)
    mask = torch.ones(B, NC, dtype=torch.bool)
    mask[1, 3:] = False
    return context, mask


@pytest.mark.parametrize("levels", [(5,), (3, 4, 5), (2, 3, 4, 5)])
def test_shapes_and_backward(levels):
    torch.manual_seed(0)
    model = VGGCrossAttention(7, context_dim=CTX, levels=levels, **SMALL)
    context, mask = _context()
    logits = model(torch.randn(B, 3, 64, 64), context, context_mask=mask)
    assert logits.shape == (B, 7)
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for level in levels:
        assert model.cross_attention[str(level)].attn.q_proj.weight.grad.abs().sum() > 0


def test_need_weights_per_level_rows_sum_to_one():
    torch.manual_seed(0)
    model = VGGCrossAttention(3, context_dim=CTX, levels=(3, 4, 5), **SMALL).eval()
    context, mask = _context()
    logits, weights = model(torch.randn(B, 3, 64, 64), context, context_mask=mask, need_weights=True)
    assert logits.shape == (B, 3)
    # 64x64 input: 8x8 after block 3, 4x4 after block 4, 2x2 after block 5.
    assert {level: tuple(w.shape) for level, w in weights.items()} == {
        3: (B, 4, 64, NC), 4: (B, 4, 16, NC), 5: (B, 4, 4, NC),
    }
    for w in weights.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert (w[1, ..., 3:] == 0).all()  # masked context tokens get no weight


def test_vgg16_224_attends_from_49_positions():
    torch.manual_seed(0)
    model = VGGCrossAttention(10, context_dim=CTX, width=0.125, num_heads=8).eval()
    context, mask = _context()
    _, weights = model(torch.randn(B, 3, 224, 224), context, context_mask=mask, need_weights=True)
    assert list(weights) == [5]
    assert weights[5].shape == (B, 8, 49, NC)


def test_weights_do_not_change_logits_and_masked_context_is_ignored():
    torch.manual_seed(0)
    model = VGGCrossAttention(3, context_dim=CTX, levels=(4, 5), **SMALL).eval()
    images = torch.randn(B, 3, 32, 32)
    context, mask = _context()
    logits = model(images, context, context_mask=mask)
    with_weights, _ = model(images, context, context_mask=mask, need_weights=True)
    torch.testing.assert_close(with_weights, logits)
    changed = context.clone()
    changed[1, 3:] = 100.0  # padded positions
    torch.testing.assert_close(model(images, changed, context_mask=mask), logits)
    # ...while the kept context does matter.
    other, _ = _context(seed=1)
    assert not torch.allclose(model(images, other), model(images, context), atol=1e-3)


def test_no_context_mode_is_plain_vgg():
    torch.manual_seed(0)
    model = VGGCrossAttention(4, context_dim=CTX, **SMALL).eval()
    plain = VGGCrossAttention(4, **SMALL).eval()
    assert len(plain.cross_attention) == 0
    assert not any(isinstance(m, CrossAttention) for m in plain.modules())
    plain.load_state_dict(model.state_dict(), strict=False)
    images = torch.randn(B, 3, 32, 32)
    torch.testing.assert_close(model(images), plain(images))
    logits, weights = plain(images, need_weights=True)
    assert logits.shape == (B, 4) and weights == {}
    with pytest.raises(ValueError, match="context_dim=None"):
        plain(images, _context()[0])


def test_bad_context_names_the_shape():
    model = VGGCrossAttention(4, context_dim=CTX, **SMALL)
    images = torch.randn(B, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(2, Nc, 12\)"):
        model(images, torch.randn(B, CTX))
    with pytest.raises(ValueError, match="context_mask"):
        model(images, torch.randn(B, NC, CTX), context_mask=torch.ones(B, NC + 1, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"levels": (1, 5)}, "levels"),
        ({"levels": (2, 6)}, "levels"),
        ({"levels": (5, 5)}, "levels"),
        ({"levels": ()}, "levels"),
        ({"depth": 19}, "depth"),
        ({"impl": "nope"}, "impl"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_heads": 3}, "block 5 has 64 channels"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VGGCrossAttention(4, **{**SMALL, "context_dim": CTX, **kwargs})


def test_attention_parameters_cover_exactly_the_attention_layers():
    model = VGGCrossAttention(4, context_dim=CTX, levels=(3, 5), **SMALL)
    attn_layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    assert len(attn_layers) == 2
    expected = {id(p) for layer in attn_layers for p in layer.parameters()}
    got = [id(p) for p in model.attention_parameters()]
    assert len(got) == len(set(got)) and set(got) == expected
    # The two optimiser groups partition the model.
    rest = [p for p in model.parameters() if id(p) not in expected]
    assert len(rest) + len(got) == len(list(model.parameters()))
    assert list(VGGCrossAttention(4, **SMALL).attention_parameters()) == []


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = VGGCrossAttention(6, context_dim=CTX, levels=(4, 5), batch_norm=True, hidden_dim=16, **SMALL)
    images = torch.randn(B, 3, 32, 32)
    context, mask = _context()
    model(images, context, context_mask=mask)  # move the BatchNorm running statistics
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VGGCrossAttention.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    assert isinstance(loaded.config.levels, tuple)
    torch.testing.assert_close(loaded(images, context, context_mask=mask),
                               model(images, context, context_mask=mask), rtol=0, atol=0)


def test_tampered_config_raises_naming_the_file(tmp_path):
    VGGCrossAttention(4, context_dim=CTX, **SMALL).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "vgg_cross_attention", "num_classes": ')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        VGGCrossAttention.from_pretrained(tmp_path)
    config.write_text(json.dumps({"model_type": "vgg_cross_attention", "num_classes": 4, "depthh": 16}))
    with pytest.raises(ValueError, match=r"config\.json: invalid model config.*depthh"):
        VGGCrossAttention.from_pretrained(tmp_path)
    config.write_text(json.dumps({"model_type": "something_else"}))
    with pytest.raises(ValueError, match="does not describe"):
        VGGCrossAttention.from_pretrained(tmp_path)
    VGGCrossAttention(4, context_dim=CTX, **SMALL).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        VGGCrossAttention.from_pretrained(tmp_path)


def test_config_dict_roundtrip():
    cfg = VGGCrossAttentionConfig(num_classes=3, context_dim=8, levels=[3, 5])
    assert cfg.levels == (3, 5)
    assert VGGCrossAttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = VGGCrossAttention(4, context_dim=CTX, dropout=0.0, attn_dropout=0.5, **SMALL)
    images = torch.randn(B, 3, 32, 32)
    context, _ = _context()
    assert not torch.allclose(model(images, context), model(images, context))  # attention dropout
    model.eval()
    torch.testing.assert_close(model(images, context), model(images, context))


def test_cross_attention_takes_one_attention_config():
    config = AttentionConfig("local", window=3, num_global=1)
    model = VGGCrossAttention(4, depth=11, width=0.125, context_dim=6, num_heads=2, levels=(4, 5), image_size=32,
                              impl=config).eval()
    assert model.config.attention == config
    assert [level.attn.attn.config for level in model.cross_attention.values()] == [config, config]
    assert VGGCrossAttentionConfig.from_dict(model.config.to_dict()) == model.config
    images, context = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 6)
    assert torch.isfinite(model(images, context)).all()
    lowrank = VGGCrossAttention(4, depth=11, width=0.125, context_dim=6, num_heads=2, image_size=32,
                                impl="lowrank", rank=2, max_context_tokens=5)
    assert lowrank.cross_attention["5"].attn.attn.proj_k.shape == (2, 5)
    with pytest.raises(ValueError, match="needs max_context_tokens"):
        VGGCrossAttention(4, context_dim=6, impl="lowrank", rank=2)


def test_warns_once_when_a_level_grid_is_1x1(caplog):
    with caplog.at_level("WARNING", logger="mmfuse.models.vgg"):
        VGGCrossAttention(4, context_dim=CTX, levels=(4, 5), **SMALL)  # 32 px: block 5 is 1x1
    warnings = [r for r in caplog.records if "1x1" in r.getMessage()]
    assert len(warnings) == 1 and "block(s) 5" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmfuse.models.vgg"):
        VGGCrossAttention(4, context_dim=CTX, levels=(4, 5), **{**SMALL, "image_size": 64})  # 2x2
    assert not [r for r in caplog.records if "1x1" in r.getMessage()]


def test_gated_levels_start_as_the_identity_and_open():
    torch.manual_seed(0)
    model = VGGCrossAttention(3, context_dim=CTX, levels=(2, 4), residual="gate", **SMALL).eval()
    context, mask = _context()
    images = torch.randn(B, 3, 64, 64)
    # gates at 0: the context changes nothing yet
    torch.testing.assert_close(model(images, context, context_mask=mask), model(images, context.flip(0),
                                                                                 context_mask=mask.flip(0)))
    logits = model(images, context, context_mask=mask)
    logits.sum().backward()
    gates = [model.cross_attention[k].gate for k in ("2", "4")]
    assert all(g.grad is not None and float(g.grad.abs()) > 0 for g in gates)
    with torch.no_grad():
        for g in gates:
            g.fill_(0.5)
    assert not torch.allclose(model(images, context, context_mask=mask),
                              model(images, context.flip(0), context_mask=mask.flip(0)))


@pytest.mark.parametrize("residual", ["norm", "gate"])
def test_mlp_after_attention_trains_and_a_gated_one_starts_as_the_identity(residual):
    torch.manual_seed(0)
    model = VGGCrossAttention(3, context_dim=CTX, levels=(4, 5), residual=residual, mlp_ratio=2.0, **SMALL)
    level = model.cross_attention["5"]
    assert level.mlp.fc1.out_features == 2 * 64 and level.norm2 is not None
    assert (level.gate2 is not None) == (residual == "gate")
    context, mask = _context()
    images = torch.randn(B, 3, 64, 64)
    model(images, context, context_mask=mask).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if residual == "gate":  # both gates at 0: with or without the MLP the level passes the map through
        model.eval()
        plain = VGGCrossAttention(3, levels=(4, 5), **SMALL).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("cross_attention")})
        torch.testing.assert_close(model(images, context, context_mask=mask), plain(images))
    assert VGGCrossAttentionConfig(4, mlp_ratio=4.0).to_dict()["mlp_ratio"] == 4.0
    with pytest.raises(ValueError, match="mlp_ratio"):
        VGGCrossAttentionConfig(4, mlp_ratio=-1.0)
