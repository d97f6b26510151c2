"""The attention core (mmfuse.attention): the auto (fused) and math implementations."""

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from mmfuse.attention import Attention, AttentionConfig, attend

pytestmark = pytest.mark.usefixtures("single_thread")


def qkv(B=2, H=2, Nq=3, Nk=5, D=4, dtype=torch.float32, requires_grad=False):
    return tuple(torch.randn(B, H, n, D, dtype=dtype, requires_grad=requires_grad) for n in (Nq, Nk, Nk))


MASK = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])


def test_math_is_scaled_softmax_attention():
    q, k, v = qkv()
    out, weights = attend(q, k, v, key_padding_mask=MASK, impl="math", need_weights=True)
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    expected = scores.masked_fill(~MASK[:, None, None, :], float("-inf")).softmax(-1)
    assert_close(weights, expected)
    assert_close(out, expected @ v)


def test_weights_rows_sum_to_one_over_kept_keys():
    q, k, v = qkv()
    _, weights = attend(q, k, v, key_padding_mask=MASK, need_weights=True)  # auto falls back to math
    assert weights.shape == (2, 2, 3, 5)
    assert_close(weights.sum(-1), torch.ones(2, 2, 3))
    assert (weights.masked_select(~MASK[:, None, None, :]) == 0).all()


def test_auto_returns_no_weights_unless_asked():
    q, k, v = qkv()
    assert attend(q, k, v, impl="auto")[1] is None


def test_auto_matches_math_forward_and_gradients():
    q, k, v = qkv(requires_grad=True)
    grads = {}
    outs = {}
    for impl in ("auto", "math"):
        out, _ = attend(q, k, v, key_padding_mask=MASK, impl=impl)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        grads[impl] = torch.autograd.grad(out, (q, k, v), g)
        outs[impl] = out
    assert_close(outs["auto"], outs["math"])
    assert_close(grads["auto"], grads["math"])


@pytest.mark.parametrize("impl", ["auto", "math"])
def test_fully_masked_sample_gives_finite_zeros_and_gradients(impl):
    q, k, v = qkv(requires_grad=True)
    mask = MASK.clone()
    mask[1] = False
    out, weights = attend(q, k, v, key_padding_mask=mask, impl=impl, need_weights=impl == "math")
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    if weights is not None:
        assert (weights[1] == 0).all()
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][1] == 0).all()


def test_auto_gradcheck_float64():
    inputs = qkv(B=2, H=1, Nq=2, Nk=5, D=3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v, key_padding_mask=MASK, impl="auto")[0],
                                    inputs)


def test_math_gradcheck_float64():
    inputs = qkv(B=2, H=1, Nq=2, Nk=5, D=3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v, key_padding_mask=MASK, impl="math")[0],
                                    inputs)


def test_dropout_only_in_training():
    q, k, v = qkv()
    attn = Attention(dropout=0.5)
    reference, _ = attend(q, k, v)
    attn.eval()
    assert_close(attn(q, k, v)[0], reference)
    assert_close(attn(q, k, v)[0], attn(q, k, v)[0])
    attn.train()
    assert not torch.allclose(attn(q, k, v)[0], reference)


@pytest.mark.parametrize("impl", ["auto", "math"])
def test_dropout_in_training_keeps_the_expectation(impl):
    # Inverted dropout on the probabilities: the mean over many draws approaches the dropout-free output.
    q, k, v = qkv(B=1, H=1, Nq=1, Nk=4, D=2)
    q, k, v = (t.expand(4000, -1, -1, -1) for t in (q, k, v))
    out, _ = attend(q, k, v, dropout_p=0.3, impl=impl)
    assert_close(out.mean(0), attend(q[:1], k[:1], v[:1], impl=impl)[0][0], atol=0.05, rtol=0)


def test_unknown_impl_is_a_value_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention impl 'nope'"):
        attend(q, k, v, impl="nope")
    with pytest.raises(ValueError, match="unknown attention impl 'nope'"):
        Attention(impl="nope")


def test_bad_shapes_and_masks_are_value_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"must be 4-D"):
        attend(q[0], k, v)
    with pytest.raises(ValueError, match=r"\(B, N\) = \(2, 5\), got \(2, 4\)"):
        attend(q, k, v, key_padding_mask=MASK[:, :4])
    with pytest.raises(ValueError, match="bool"):
        attend(q, k, v, key_padding_mask=MASK.float())


# --- AttentionConfig -------------------------------------------------------------------------------


def test_attention_config_round_trips_through_json_and_keeps_only_set_options():
    import json

    config = AttentionConfig("local", window=8, num_global=2)
    assert config.to_dict() == {"impl": "local", "window": 8, "num_global": 2}
    assert AttentionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.options == {"window": 8, "num_global": 2}
    with pytest.raises(ValueError, match=r"unknown attention option\(s\) \['windw'\]"):
        AttentionConfig.from_dict({"impl": "local", "windw": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.window = 4


def test_a_name_is_shorthand_for_a_config():
    assert AttentionConfig.coerce("chunked") == AttentionConfig("chunked")
    config = AttentionConfig("chunked", block_q=4)
    assert AttentionConfig.coerce(config) is config
    with pytest.raises(TypeError, match="name or an AttentionConfig"):
        AttentionConfig.coerce(3)
    assert Attention(impl="chunked", block_q=4).config == config == Attention(impl=config).config
    assert Attention(impl=config, block_k=8).options == {"block_q": 4, "block_k": 8}  # keywords add to it


def test_for_keys_sizes_lowrank_only_and_never_overrides_a_given_max_len():
    lowrank = AttentionConfig("lowrank", rank=4)
    assert lowrank.for_keys(10).max_len == 10
    assert lowrank.for_keys(10).for_keys(20).max_len == 10
    assert AttentionConfig("local", window=3).for_keys(10) == AttentionConfig("local", window=3)
    assert Attention(impl=lowrank.for_keys(10)).proj_k.shape == (4, 10)
    assert [AttentionConfig(i).returns_weights for i in ("auto", "math", "chunked")] == [True, True, False]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"impl": "nope"}, "unknown attention impl 'nope'"),
    ({"impl": "auto", "window": 4}, r"window= applies to impl in \['local'\], not impl='auto'"),
    ({"impl": "local"}, "needs window="),
    ({"impl": "lowrank", "max_len": 8}, "needs rank="),
    ({"impl": "chunked", "block_q": 0}, "block_q must be an int >= 1"),
])
def test_attention_config_rejects_what_the_impl_cannot_use(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**kwargs)
