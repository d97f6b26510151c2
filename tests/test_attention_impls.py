"""The efficient attention implementations (chunked, local, lowrank) against the math reference."""

import pytest
import torch
from torch.profiler import profile
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from mmfuse import attention
from mmfuse._attention_blocked import dense_plan, local_plan
from mmfuse.attention import IMPLS, SMALL_SCORES, Attention, attend, local_attention_mask

pytestmark = pytest.mark.usefixtures("single_thread")

FUSED_KERNEL = "aten::_scaled_dot_product_flash_attention_for_cpu"


def qkv(B=2, H=2, Nq=3, Nk=5, D=4, dtype=torch.float32, requires_grad=False):
    return tuple(torch.randn(B, H, n, D, dtype=dtype, requires_grad=requires_grad) for n in (Nq, Nk, Nk))


def padding_mask(B, Nk, empty_sample=False):
    mask = torch.rand(B, Nk) > 0.3
    mask[:, 0] = True
    if empty_sample:
        mask[-1] = False
    return mask


def forward_and_grads(q, k, v, **kwargs):
    out, _ = attend(q, k, v, **kwargs)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def local_reference(q, k, v, key_padding_mask, window, num_global):
    """math attention under the explicit local mask; rows with no visible kept key give zeros."""
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    keep = local_attention_mask(Nq, Nk, window=window, num_global=num_global).expand(B, 1, Nq, Nk)
    if key_padding_mask is not None:
        # attend() lets a sample with no kept key see every key (then zeroes it); mirror that.
        kpm = key_padding_mask | ~key_padding_mask.any(-1, keepdim=True)
        keep = keep & kpm[:, None, None, :]
    empty = ~keep.any(-1, keepdim=True)  # (B, 1, Nq, 1)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~(keep | empty), float("-inf")).softmax(-1)
    out = (probs @ v).masked_fill(empty, 0.0)
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask.any(-1)[:, None, None, None], 0.0)
    return out


def test_impls_are_registered():
    assert set(IMPLS) == {"auto", "math", "chunked", "local", "lowrank"}


# --- chunked -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("Nq", "Nk", "block_q", "block_k"), [
    (37, 53, 8, 16),     # neither length a multiple of its block
    (5, 70, 2, 64),      # Nq << Nk, one partial key tile
    (64, 64, 64, 64),    # one tile: plain softmax
    (16, 3, 4, 1),       # one key per tile: the running max changes every step
])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_matches_math_forward_and_gradients(Nq, Nk, block_q, block_k, masked):
    q, k, v = qkv(B=3, Nq=Nq, Nk=Nk, D=8, requires_grad=True)
    mask = padding_mask(3, Nk, empty_sample=True) if masked else None
    expected = forward_and_grads(q, k, v, key_padding_mask=mask, impl="math")
    actual = forward_and_grads(q, k, v, key_padding_mask=mask, impl="chunked", block_q=block_q, block_k=block_k)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(t).all() for t in actual)
    if masked:
        assert (actual[0][-1] == 0).all() and (actual[1][-1] == 0).all()


def test_chunked_key_masked_in_a_whole_tile():
    # The first key tile is entirely padding: the running max starts at -inf there and must not NaN.
    q, k, v = qkv(B=1, Nq=4, Nk=12, requires_grad=True)
    mask = torch.arange(12)[None] >= 4
    expected = forward_and_grads(q, k, v, key_padding_mask=mask, impl="math")
    assert_close(forward_and_grads(q, k, v, key_padding_mask=mask, impl="chunked", block_k=4), expected)


def test_chunked_gradcheck_float64():
    q, k, v = qkv(B=2, H=1, Nq=5, Nk=7, D=3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False, True, True], [False] * 7])

    def fn(q, k, v):
        return attend(q, k, v, key_padding_mask=mask, impl="chunked", block_q=2, block_k=3)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_chunked_dropout_backward_regenerates_the_forward_masks():
    q, k, v = qkv(B=1, H=2, Nq=4, Nk=6, D=3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        torch.manual_seed(3)  # the same dropout draw on every call, so the function is deterministic
        return attend(q, k, v, impl="chunked", dropout_p=0.4, block_q=3, block_k=4)[0]

    assert not torch.allclose(fn(q, k, v), attend(q, k, v, impl="math")[0])
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_chunked_dropout_keeps_the_expectation():
    q, k, v = (t.expand(4000, -1, -1, -1) for t in qkv(B=1, H=1, Nq=1, Nk=4, D=2))
    out, _ = attend(q, k, v, dropout_p=0.3, impl="chunked", block_k=3)
    assert_close(out.mean(0), attend(q[:1], k[:1], v[:1], impl="math")[0][0], atol=0.05, rtol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest_tensor_in_forward_and_backward(q, k, v, **kwargs):
    with _LargestTensor() as largest:
        out, _ = attend(q, k, v, **kwargs)
        out.sum().backward()
    return largest.numel


@pytest.mark.parametrize(("impl", "options"), [("chunked", {"block_q": 32, "block_k": 64}),
                                               ("local", {"window": 16, "num_global": 2, "block_q": 32})])
def test_blocked_impls_never_build_an_nq_by_nk_tensor(impl, options):
    q, k, v = qkv(B=1, H=2, Nq=512, Nk=512, D=8, requires_grad=True)
    scores = 2 * 512 * 512
    assert largest_tensor_in_forward_and_backward(q, k, v, impl="math") >= scores  # the probe sees them
    assert largest_tensor_in_forward_and_backward(q, k, v, impl=impl, **options) <= scores // 32


def test_chunked_refuses_weights():
    with pytest.raises(ValueError, match="does not return attention weights"):
        attend(*qkv(), impl="chunked", need_weights=True)


# --- local ---------------------------------------------------------------------------------------

def test_local_mask_self_attention_is_a_band_plus_global_rows_and_columns():
    mask = local_attention_mask(6, 6, window=3, num_global=1)
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(mask, ((i - j).abs() <= 1) | (i == 0) | (j == 0))
    # An even window reaches one further to the left.
    assert torch.equal(local_attention_mask(6, 6, window=2), (i - j >= 0) & (i - j <= 1))


def test_local_mask_maps_queries_onto_the_key_axis_when_lengths_differ():
    mask = local_attention_mask(3, 9, window=1, num_global=2)  # centres 0, 4, 8; global columns only
    expected = torch.zeros(3, 9, dtype=torch.bool)
    expected[:, :2] = True
    expected[[0, 1, 2], [0, 4, 8]] = True
    assert torch.equal(mask, expected)
    assert torch.equal(local_attention_mask(1, 5, window=1), torch.tensor([[False, False, True, False, False]]))


@pytest.mark.parametrize(("window", "num_global"), [(1, 0), (4, 0), (5, 2), (9, 3), (200, 0)])
@pytest.mark.parametrize(("Nq", "Nk"), [(37, 37), (13, 50), (50, 13)])
def test_local_matches_math_with_the_explicit_mask(window, num_global, Nq, Nk):
    q, k, v = qkv(B=3, Nq=Nq, Nk=Nk, D=8, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(3, Nk, empty_sample=True)
    g = torch.randn(3, 2, Nq, 8, dtype=torch.float64)
    expected = local_reference(q, k, v, mask, window, num_global)
    actual, _ = attend(q, k, v, key_padding_mask=mask, impl="local", window=window, num_global=num_global,
                       block_q=8, block_k=16)
    assert_close(actual, expected)
    assert_close(torch.autograd.grad(actual, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g))


def test_local_with_a_covering_window_is_exact_attention():
    q, k, v = qkv(B=2, Nq=20, Nk=30, D=8, requires_grad=True)
    mask = padding_mask(2, 30)
    expected = forward_and_grads(q, k, v, key_padding_mask=mask, impl="math")
    actual = forward_and_grads(q, k, v, key_padding_mask=mask, impl="local", window=2 * 30 - 1, block_q=7)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_local_row_whose_window_is_all_padding_gives_finite_zeros():
    # Self-attention over a padded sequence: the padded tail's windows hold padding only.
    q, k, v = qkv(B=1, H=1, Nq=12, Nk=12, D=4, requires_grad=True)
    mask = torch.arange(12)[None] < 5
    out = forward_and_grads(q, k, v, key_padding_mask=mask, impl="local", window=3, block_q=4)
    assert all(torch.isfinite(t).all() for t in out)
    assert (out[0][0, 0, 7:] == 0).all()


def test_local_gradcheck_float64():
    q, k, v = qkv(B=1, H=1, Nq=7, Nk=9, D=3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True, True, False, True, True]])

    def fn(q, k, v):
        return attend(q, k, v, key_padding_mask=mask, impl="local", window=3, num_global=1, block_q=3)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_local_cost_grows_linearly():
    def scores_computed(n):
        plan = local_plan(n, n, window=64, num_global=8, block_q=128, block_k=1024)
        return sum((q1 - q0) * (t.k1 - t.k0) for q0, q1, tiles in plan for t in tiles)

    assert scores_computed(8192) <= 2.1 * scores_computed(4096)
    # Per query: its window plus one block of slack, the global keys, and the global rows' full rows.
    assert scores_computed(8192) <= 8192 * (64 + 128 + 2 * 8)
    dense = sum((q1 - q0) * (t.k1 - t.k0) for q0, q1, tiles in dense_plan(100, 70, 32, 16) for t in tiles)
    assert dense == 100 * 70


def test_local_needs_a_window_and_refuses_weights():
    with pytest.raises(ValueError, match="needs window="):
        attend(*qkv(), impl="local")
    with pytest.raises(ValueError, match="does not return attention weights"):
        attend(*qkv(), impl="local", window=3, need_weights=True)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        attend(*qkv(), impl="local", window=0)


# --- lowrank -------------------------------------------------------------------------------------

def test_lowrank_is_attention_over_projected_keys_and_values():
    q, k, v = qkv(Nk=5)
    E, F = torch.randn(3, 8), torch.randn(3, 8)
    out, _ = attend(q, k, v, impl="lowrank", proj_k=E, proj_v=F)
    expected, _ = attend(q, E[:, :5] @ k, F[:, :5] @ v, impl="math")
    assert_close(out, expected)


def test_lowrank_ignores_padded_positions_and_trains_its_projections():
    attn = Attention(impl="lowrank", rank=4, max_len=16)
    q, k, v = qkv(B=2, Nk=10, requires_grad=True)
    mask = padding_mask(2, 10)
    out, _ = attn(q, k, v, key_padding_mask=mask)
    pad = ~mask[:, None, :, None]
    k2, v2 = k.detach().masked_fill(pad, 100.0), v.detach().masked_fill(pad, -7.0)
    assert_close(attn(q, k2, v2, key_padding_mask=mask)[0], out)
    out.square().sum().backward()
    for proj in (attn.proj_k, attn.proj_v):
        assert proj.grad[:, :10].abs().sum() > 0
        assert (proj.grad[:, 10:] == 0).all()  # columns past Nk are not used


def test_lowrank_errors():
    q, k, v = qkv(Nk=9)
    E = torch.randn(3, 8)
    with pytest.raises(ValueError, match="max_len=8 keys, got Nk=9"):
        attend(q, k, v, impl="lowrank", proj_k=E, proj_v=E)
    with pytest.raises(ValueError, match="needs proj_k= and proj_v="):
        attend(q, k, v, impl="lowrank")
    with pytest.raises(ValueError, match=r"\(rank, max_len\)"):
        attend(q, k, v, impl="lowrank", proj_k=E, proj_v=torch.randn(2, 8))
    with pytest.raises(ValueError, match="does not return attention weights"):
        attend(q, k, v, impl="lowrank", proj_k=E, proj_v=E, need_weights=True)
    with pytest.raises(ValueError, match="needs rank= and max_len="):
        Attention(impl="lowrank", rank=4)


# --- the Attention module and auto -----------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"impl": "auto", "window": 4}, r"window= applies to impl in \['local'\], not impl='auto'"),
    ({"impl": "math", "block_q": 4}, "block_q= applies to impl in"),
    ({"impl": "chunked", "rank": 4}, "rank= applies to impl in"),
    ({"impl": "local", "num_global": 2}, "needs window="),
    ({"impl": "local", "window": -1}, "window must be an int >= 1"),
    ({"impl": "local", "window": 3, "num_global": -1}, "num_global must be an int >= 0"),
    ({"impl": "chunked", "block_k": 2.5}, "block_k must be an int"),
    ({"impl": "lowrank", "rank": True, "max_len": 8}, "rank must be an int"),
])
def test_attention_module_validates_its_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(**kwargs)


def test_attend_rejects_options_of_another_impl():
    with pytest.raises(ValueError, match=r"impl='auto' takes no option\(s\) \['window'\]"):
        attend(*qkv(), impl="auto", window=3)


@pytest.mark.parametrize(("impl", "options"), [("chunked", {"block_q": 2, "block_k": 3}),
                                               ("local", {"window": 3, "num_global": 1})])
def test_attention_module_passes_its_options(impl, options):
    attn = Attention(impl=impl, **options)
    q, k, v = qkv(Nq=7, Nk=7)
    assert_close(attn(q, k, v)[0], attend(q, k, v, impl=impl, **options)[0])
    assert all(f"{name}={value}" in repr(attn) for name, value in options.items())


def kernels_run(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("masked", [False, True])
def test_auto_runs_the_fused_kernel(masked):
    q, k, v = qkv(B=2, H=2, Nq=64, Nk=128, D=32, requires_grad=True)  # above SMALL_SCORES
    mask = padding_mask(2, 128) if masked else None

    def step():
        out, _ = Attention(impl="auto")(q, k, v, key_padding_mask=mask)
        out.sum().backward()

    names = kernels_run(step)
    assert FUSED_KERNEL in names
    assert "aten::_softmax" not in names  # no explicit-softmax fallback


def test_auto_runs_math_for_small_problems_on_cpu(monkeypatch):
    q, k, v = qkv(B=2, H=2, Nq=16, Nk=64, D=32, requires_grad=True)
    assert q.shape[2] * k.shape[2] <= SMALL_SCORES
    names = kernels_run(lambda: attend(q, k, v, impl="auto")[0].sum().backward())
    assert FUSED_KERNEL not in names and "aten::_softmax" in names
    with torch.no_grad():
        names = kernels_run(lambda: attend(q, k, v, impl="auto"))
    assert FUSED_KERNEL not in names and "aten::_softmax" in names
    # bf16 runs explicitly only on a CPU with bf16 units; elsewhere explicit bf16 matmuls are emulated, and the
    # fused kernel, which computes it in fp32, is the faster.
    q, k, v = (x.detach().bfloat16() for x in (q, k, v))
    monkeypatch.setattr(attention, "cpu_bf16_support", lambda: "none")
    assert FUSED_KERNEL in kernels_run(lambda: attend(q, k, v, impl="auto"))
    for units in ("avx512_bf16", "amx"):
        monkeypatch.setattr(attention, "cpu_bf16_support", lambda units=units: units)
        names = kernels_run(lambda: attend(q, k, v, impl="auto"))
        assert FUSED_KERNEL not in names and "aten::_softmax" in names
