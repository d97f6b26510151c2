"""CrossAttention against torch.nn.MultiheadAttention, and its own promises."""

import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mmfuse import attention
from mmfuse.attention import AttentionConfig
from mmfuse.layers import AttentionBlock, CrossAttention

pytestmark = pytest.mark.usefixtures("single_thread")


def randomize(module: nn.Module) -> nn.Module:
    """Non-zero biases too, so that copying them wrongly shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def to_mha(layer: CrossAttention) -> nn.MultiheadAttention:
    """A MultiheadAttention computing the same function (needs dim == query_dim == out_dim)."""
    mha = nn.MultiheadAttention(layer.dim, layer.num_heads, batch_first=True, kdim=layer.context_dim,
                                vdim=layer.context_dim)
    q, k, v = layer.q_proj, layer.k_proj, layer.v_proj
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        else:
            mha.q_proj_weight.copy_(q.weight)
            mha.k_proj_weight.copy_(k.weight)
            mha.v_proj_weight.copy_(v.weight)
        mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        mha.out_proj.weight.copy_(layer.out_proj.weight)
        mha.out_proj.bias.copy_(layer.out_proj.bias)
    return mha.eval()


MASK = torch.tensor([[True, True, True, False, False, True, False],
                     [True, True, True, True, True, True, True],
                     [False, True, False, False, False, False, False]])


@pytest.mark.parametrize("context_dim", [16, 24], ids=["same_dims", "kdim_vdim"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("impl", ["auto", "math"])
def test_cross_attention_matches_multihead_attention(context_dim, masked, impl):
    layer = randomize(CrossAttention(16, context_dim, num_heads=4, impl=impl)).eval()
    mha = to_mha(layer)
    x, context = torch.randn(3, 5, 16), torch.randn(3, 7, context_dim)
    mask = MASK if masked else None
    out, weights = layer(x, context, context_mask=mask, need_weights=True)
    ref, ref_weights = mha(x, context, context, key_padding_mask=None if mask is None else ~mask,
                           need_weights=True, average_attn_weights=False)
    assert_close(out, ref)
    assert_close(weights, ref_weights)
    assert_close(layer(x, context, context_mask=mask)[0], ref)  # the fused path too


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_self_attention_matches_multihead_attention(masked):
    layer = randomize(CrossAttention(16, 16, num_heads=2)).eval()
    mha = to_mha(layer)
    x = torch.randn(3, 7, 16)
    mask = MASK if masked else None
    out, weights = layer(x, x, context_mask=mask, need_weights=True)
    ref, ref_weights = mha(x, x, x, key_padding_mask=None if mask is None else ~mask, need_weights=True,
                           average_attn_weights=False)
    kept = torch.ones(3, 7, dtype=torch.bool) if mask is None else mask
    assert_close(out[kept], ref[kept])
    assert_close(weights.transpose(1, 2)[kept], ref_weights.transpose(1, 2)[kept])
    # Padded rows enter as zeros (their queries included), so they equal MultiheadAttention's there.
    xz = torch.where(kept[..., None], x, 0.0)
    assert_close(out, mha(xz, xz, xz, key_padding_mask=~kept, need_weights=False)[0])


def test_matches_multihead_attention_dropout_off_in_eval():
    layer = randomize(CrossAttention(8, 8, num_heads=2, dropout=0.5)).eval()
    x = torch.randn(2, 4, 8)
    assert_close(layer(x, x)[0], to_mha(layer)(x, x, x, need_weights=False)[0])


def test_dropout_acts_in_training():
    layer = CrossAttention(8, 8, num_heads=2, dropout=0.5)
    x = torch.randn(2, 4, 8)
    assert not torch.allclose(layer(x, x)[0], layer.eval()(x, x)[0])


@pytest.mark.parametrize(
    ("impl", "options"),
    [("chunked", {"block_q": 2, "block_k": 3}), ("local", {"window": 15})],  # window covers all 7 keys
)
def test_attention_config_reaches_the_attention(impl, options):
    config = AttentionConfig(impl, **options)
    layer = CrossAttention(16, 24, num_heads=4, impl=config).eval()
    assert layer.attn.impl == impl and layer.attn.options == options and layer.attn.config == config
    reference = CrossAttention(16, 24, num_heads=4, impl="math").eval()
    reference.load_state_dict(layer.state_dict())
    x, context = torch.randn(3, 5, 16), torch.randn(3, 7, 24)
    assert_close(layer(x, context, context_mask=MASK)[0], reference(x, context, context_mask=MASK)[0])


def test_lowrank_config_sizes_the_projections_by_max_len():
    layer = CrossAttention(16, 24, num_heads=4, impl=AttentionConfig("lowrank", rank=3).for_keys(7))
    assert layer.attn.proj_k.shape == (3, 7)
    out, _ = layer(torch.randn(3, 5, 16), torch.randn(3, 7, 24), context_mask=MASK)
    assert out.shape == (3, 5, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="needs rank= and max_len="):
        CrossAttention(16, 24, num_heads=4, impl=AttentionConfig("lowrank", rank=3))


def test_weights_rows_sum_to_one_over_kept_keys():
    layer = CrossAttention(16, 24, num_heads=4)
    _, weights = layer(torch.randn(3, 5, 16), torch.randn(3, 7, 24), context_mask=MASK, need_weights=True)
    assert weights.shape == (3, 4, 5, 7)
    assert_close(weights.sum(-1), torch.ones(3, 4, 5))
    assert (weights.masked_select(~MASK[:, None, None, :]) == 0).all()


def test_no_weights_unless_asked():
    layer = CrossAttention(16, 24, num_heads=4, impl="math")
    assert layer(torch.randn(1, 2, 16), torch.randn(1, 3, 24))[1] is None


@pytest.mark.parametrize("impl", ["auto", "math"])
def test_permuting_context_tokens_and_mask_changes_nothing(impl):
    layer = randomize(CrossAttention(16, 24, num_heads=4, impl=impl)).eval()
    x, context = torch.randn(3, 5, 16), torch.randn(3, 7, 24)
    perm = torch.randperm(7)
    out, weights = layer(x, context, context_mask=MASK, need_weights=True)
    out_p, weights_p = layer(x, context[:, perm], context_mask=MASK[:, perm], need_weights=True)
    assert_close(out_p, out)
    assert_close(weights_p, weights[..., perm])


@pytest.mark.parametrize("null_key", [False, True], ids=["", "null_key"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("impl", ["auto", "math", "chunked"])
def test_a_shared_context_matches_a_context_per_row(impl, masked, null_key):
    """context_index against the same contexts copied to every row: outputs, weights and every gradient.
    On CPU, auto and math lay the rows out by context (one matrix product per context); chunked gathers."""
    layer = CrossAttention(16, 24, num_heads=4, impl=impl, dropout=0.0, null_key=null_key)
    layer = randomize(layer).double().train()
    index = torch.tensor([2, 0, 2, 1, 0, 2])
    x = torch.randn(6, 5, 16, dtype=torch.double, requires_grad=True)
    context = torch.randn(3, 7, 24, dtype=torch.double, requires_grad=True)
    mask = MASK if masked else None
    weigh = impl != "chunked"
    shared, shared_w = layer(x, context, context_mask=mask, context_index=index, need_weights=weigh)
    rows, rows_w = layer(x, context[index], context_mask=None if mask is None else mask[index], need_weights=weigh)
    assert_close(shared, rows)
    if weigh:
        assert_close(shared_w, rows_w)
    probe = torch.randn_like(shared)
    inputs = [x, context, *layer.parameters()]
    assert_close(torch.autograd.grad((shared * probe).sum(), inputs), torch.autograd.grad((rows * probe).sum(), inputs))
    if masked:  # context 2 has one kept key, context 0 three: an empty context still gives zeros
        empty = torch.zeros(3, 7, dtype=torch.bool)
        assert (layer(x, context, context_mask=empty, context_index=index)[0] == 0).all()


@pytest.mark.parametrize("impl", ["auto", "math", "chunked"])
def test_null_key_is_one_more_key_and_value_for_every_query(impl):
    layer = randomize(CrossAttention(16, 24, num_heads=4, impl=impl, null_key=True)).double().eval()
    x, context = torch.randn(3, 5, 16, dtype=torch.double), torch.randn(3, 7, 24, dtype=torch.double)
    out, _ = layer(x, context, context_mask=MASK)
    H, Dh = 4, 4
    q = layer.q_proj(x).view(3, 5, H, Dh).transpose(1, 2)
    k = torch.cat([layer.k_proj(context).view(3, 7, H, Dh).transpose(1, 2), layer.null_k.expand(3, H, 1, Dh)], 2)
    v = torch.cat([layer.v_proj(context).view(3, 7, H, Dh).transpose(1, 2), layer.null_v.expand(3, H, 1, Dh)], 2)
    scores = (q @ k.transpose(-2, -1)) / Dh**0.5  # (3, H, 5, 8)
    keep = torch.cat([MASK, torch.ones(3, 1, dtype=torch.bool)], 1)[:, None, None, :]
    ref = (scores.masked_fill(~keep, -torch.inf).softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 16)
    assert_close(out, layer.out_proj(ref))
    if impl != "chunked":
        weights = layer(x, context, context_mask=MASK, need_weights=True)[1]
        assert weights.shape == (3, 4, 5, 7) and (weights.sum(-1) < 1).all()  # the null key took the rest


def test_null_key_lets_a_query_read_nothing():
    layer = randomize(CrossAttention(8, 6, num_heads=2, null_key=True)).eval()
    with torch.no_grad():
        layer.q_proj.weight.zero_()
        layer.q_proj.bias.fill_(1.0)  # every query the same, aligned with the null key only
        layer.null_k.fill_(100.0)
        layer.null_v.zero_()
    out, weights = layer(torch.randn(2, 3, 8), torch.randn(2, 4, 6), need_weights=True)
    assert weights.sum(-1).max() < 1e-6
    assert_close(out, layer.out_proj.bias.expand(2, 3, 8))  # no message from the context
    empty = torch.zeros(2, 4, dtype=torch.bool)  # no context at all is still no output at all
    assert (layer(torch.randn(2, 3, 8), torch.randn(2, 4, 6), context_mask=empty)[0] == 0).all()
    with pytest.raises(ValueError, match="null_key"):
        layer(torch.randn(2, 3, 8), torch.randn(2, 4, 6), causal=True)


def test_rows_are_laid_out_by_context_only_where_that_pads_little(monkeypatch):
    layer = CrossAttention(16, 24, num_heads=4)
    q = torch.randn(6, 5, 16)
    slots, per = layer._context_slots(q, torch.tensor([2, 0, 2, 1, 0, 2]), 3, 7)
    assert per == 3 and slots.tolist() == [6, 0, 7, 3, 1, 8]  # context * per + rank among its rows
    lopsided = torch.tensor([0] * 8 + [1, 2, 3])  # 4 contexts x 8 slots for 11 rows
    assert layer._context_slots(torch.randn(11, 5, 16), lopsided, 4, 7) is None
    for units in ("none", "avx512_bf16"):  # bf16 gathers, whether auto runs the fused kernel or the explicit path
        monkeypatch.setattr(attention, "cpu_bf16_support", lambda units=units: units)
        assert layer._context_slots(q.bfloat16(), torch.tensor([2, 0, 2, 1, 0, 2]), 3, 7) is None
    chunked = CrossAttention(16, 24, num_heads=4, impl="chunked")
    assert chunked._context_slots(q, torch.tensor([2, 0, 2, 1, 0, 2]), 3, 7) is None


def test_fully_masked_context_gives_zeros_not_bias():
    layer = randomize(CrossAttention(8, 6, num_heads=2))
    x = torch.randn(2, 3, 8, requires_grad=True)
    context = torch.randn(2, 4, 6, requires_grad=True)
    mask = torch.tensor([[False] * 4, [True, False, True, False]])
    out, weights = layer(x, context, context_mask=mask, need_weights=True)
    assert (out[0] == 0).all() and (weights[0] == 0).all()
    assert (out[1] != 0).any()
    out.sum().backward()
    for t in (x, context, *layer.parameters()):
        assert torch.isfinite(t.grad).all()


def test_dims_and_heads():
    layer = CrossAttention(12, 20, dim=32, num_heads=8, out_dim=5)
    out, _ = layer(torch.randn(2, 3, 12), torch.randn(2, 9, 20))
    assert out.shape == (2, 3, 5)
    assert layer.head_dim == 4
    assert CrossAttention(12, 20, num_heads=3).dim == 12
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by num_heads \(4\)"):
        CrossAttention(10, 20, num_heads=4)


def test_init_weights_is_xavier_with_zero_biases():
    layer = randomize(CrossAttention(16, 24, num_heads=4))
    layer.init_weights()
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
        assert (proj.bias == 0).all()
        fan_in, fan_out = proj.in_features, proj.out_features
        assert proj.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5


@pytest.mark.parametrize(
    ("x_shape", "context_shape", "mask_shape", "message"),
    [
        ((2, 3, 16), (2, 5, 32), None, "context must have shape (2, Nk, 24), got (2, 5, 32)"),
        ((2, 3, 8), (2, 5, 24), None, "x must have shape (B, Nq, 16), got (2, 3, 8)"),
        ((3, 16), (2, 5, 24), None, "x must have shape (B, Nq, 16), got (3, 16)"),
        ((2, 3, 16), (4, 5, 24), None, "context must have shape (2, Nk, 24), got (4, 5, 24)"),
        ((2, 3, 16), (2, 5, 24), (2, 4), "context_mask must have shape (B, N) = (2, 5), got (2, 4)"),
    ],
)
def test_wrong_shapes_name_expected_and_received(x_shape, context_shape, mask_shape, message):
    layer = CrossAttention(16, 24, num_heads=4)
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(torch.randn(x_shape), torch.randn(context_shape), context_mask=mask)


def test_block_checks_shapes_before_normalising():
    block = AttentionBlock(16, context_dim=24, num_heads=4)
    with pytest.raises(ValueError, match=re.escape("x must have shape (B, N, 16), got (2, 3, 8)")):
        block(torch.randn(2, 3, 8), torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match=re.escape("context must have shape (2, Nk, 24), got (2, 5, 16)")):
        block(torch.randn(2, 3, 16), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="context must be given"):
        block(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="needs self-attention, cross-attention"):
        AttentionBlock(16, self_attention=False)
