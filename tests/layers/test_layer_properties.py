"""Properties every attention layer must have, checked on each layer of mmfuse.layers.

- the fused (``auto``) and reference (``math``) attention paths agree, forward and gradients;
- ``torch.autograd.gradcheck`` passes in float64 (tiny shapes);
- changing padded positions (to random values, NaN or Inf) changes no output at kept positions and no
  gradient (of the parameters and of kept inputs), for every implementation;
- a sample whose keys are all masked gives finite outputs and finite gradients.

Each case builds the layer for an ``impl`` and calls it on a dict of inputs, returning the outputs at
kept positions only (padded query positions are zeroed, since nothing promises anything there).
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from mmfuse.attention import AttentionConfig
from mmfuse.layers import (
    AttentionBlock,
    AttentionPooling,
    CoAttention,
    CrossAttention,
    GatedCrossAttention,
    ModalitySelfAttention,
)

pytestmark = pytest.mark.usefixtures("single_thread")

B = 2


def padding_mask(n: int, kept: tuple[int, ...]) -> Tensor:
    """(B, n) mask keeping the first kept[b] positions of sample b."""
    return torch.arange(n)[None, :] < torch.tensor(kept)[:, None]


def open_gates(module: nn.Module) -> nn.Module:
    """Gated blocks are the identity at init; open them so the tests see the attention."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-1].startswith("gate_"):
                p.fill_(0.7)
    return module


@dataclass
class Case:
    build: Callable[[str], nn.Module]  # impl -> layer
    inputs: dict[str, tuple[int, int, str | None]]  # name -> (tokens, width, name of its padding mask)
    masks: dict[str, Tensor]
    call: Callable[[nn.Module, dict[str, Tensor]], Tensor]


def _masked(out: Tensor, mask: Tensor | None) -> Tensor:
    return out if mask is None else torch.where(mask[..., None], out, 0.0)


# Every implementation, with options that cover the cases' lengths (at most 7 keys).
IMPL_CONFIGS = {
    "auto": "auto",
    "math": "math",
    "chunked": AttentionConfig("chunked", block_q=2, block_k=2),
    "local": AttentionConfig("local", window=2, num_global=1, block_q=2, block_k=3),
    "lowrank": AttentionConfig("lowrank", rank=2, max_len=8),
}


CASES = {
    "cross_attention": Case(
        lambda impl: CrossAttention(6, 5, dim=8, num_heads=2, out_dim=7, impl=impl),
        {"x": (3, 6, None), "context": (5, 5, "context_mask")},
        {"context_mask": padding_mask(5, (3, 5))},
        lambda m, a: m(a["x"], a["context"], context_mask=a["context_mask"])[0],
    ),
    "self_attention": Case(
        lambda impl: CrossAttention(6, 6, num_heads=2, impl=impl),
        {"x": (5, 6, "mask")},
        {"mask": padding_mask(5, (2, 5))},
        lambda m, a: _masked(m(a["x"], a["x"], context_mask=a["mask"])[0], a["mask"]),
    ),
    "attention_block": Case(
        lambda impl: AttentionBlock(6, context_dim=5, num_heads=2, mlp_ratio=1.0, impl=impl),
        {"x": (4, 6, "mask"), "context": (5, 5, "context_mask")},
        {"mask": padding_mask(4, (4, 2)), "context_mask": padding_mask(5, (3, 5))},
        lambda m, a: _masked(m(a["x"], a["context"], mask=a["mask"], context_mask=a["context_mask"])[0],
                             a["mask"]),
    ),
    "attention_pooling": Case(
        lambda impl: AttentionPooling(6, num_queries=3, num_heads=2, depth=2, out_dim=4, mlp_ratio=1.0,
                                      impl=impl),
        {"x": (5, 6, "mask")},
        {"mask": padding_mask(5, (3, 5))},
        lambda m, a: m(a["x"], mask=a["mask"])[0],
    ),
    "modality_self_attention": Case(
        lambda impl: ModalitySelfAttention(5, 3, dim=6, num_heads=2, mlp_ratio=1.0, impl=impl),
        {"image": (4, 5, "image_mask"), "text": (3, 3, "text_mask")},
        {"image_mask": padding_mask(4, (4, 2)), "text_mask": padding_mask(3, (1, 3))},
        lambda m, a: _masked(
            m(a["image"], a["text"], image_mask=a["image_mask"], text_mask=a["text_mask"])[0],
            torch.cat([a["image_mask"], a["text_mask"]], dim=1),
        ),
    ),
    "gated_cross_attention": Case(
        lambda impl: open_gates(GatedCrossAttention(6, 5, num_heads=2, mlp_ratio=1.0, impl=impl)),
        {"x": (3, 6, None), "context": (5, 5, "context_mask")},
        {"context_mask": padding_mask(5, (2, 5))},
        lambda m, a: m(a["x"], a["context"], context_mask=a["context_mask"])[0],
    ),
    "fusion_transformer": Case(
        lambda impl: CoAttention(3, 5, dim=6, num_heads=2, depth=2, mlp_ratio=1.0, impl=impl),
        {"text": (3, 3, "text_mask"), "image": (4, 5, "image_mask")},
        {"text_mask": padding_mask(3, (2, 3)), "image_mask": padding_mask(4, (4, 1))},
        lambda m, a: _masked(
            m(a["text"], a["image"], text_mask=a["text_mask"], image_mask=a["image_mask"])[0], a["text_mask"]
        ),
    ),
}


def make_inputs(case: Case, dtype=torch.float32, requires_grad=False) -> dict[str, Tensor]:
    tensors = {name: torch.randn(B, n, width, dtype=dtype, requires_grad=requires_grad)
               for name, (n, width, _) in case.inputs.items()}
    return {**tensors, **case.masks}


def build(case: Case, impl: str, dtype=torch.float32) -> nn.Module:
    return case.build(impl).to(dtype).eval()


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


def test_auto_matches_math_forward_and_gradients(case):
    auto = build(case, "auto")
    math = build(case, "math")
    math.load_state_dict(auto.state_dict())
    inputs = make_inputs(case, requires_grad=True)
    leaves = [t for name, t in inputs.items() if name in case.inputs]
    results = []
    for layer in (auto, math):
        out = case.call(layer, inputs)
        grads = torch.autograd.grad(out.sin().sum(), [*leaves, *layer.parameters()], allow_unused=True)
        results.append((out, [torch.zeros(()) if g is None else g for g in grads]))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])


def test_gradcheck_float64(case):
    layer = build(case, "auto", torch.float64)
    inputs = make_inputs(case, torch.float64, requires_grad=True)
    names = list(case.inputs)

    def fn(*tensors):
        return case.call(layer, {**inputs, **dict(zip(names, tensors, strict=True))})

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names))


def _outputs_and_grads(case: Case, layer: nn.Module, inputs: dict[str, Tensor]) -> list[Tensor]:
    """Outputs at kept positions, then the gradients of the inputs at kept positions and of the parameters."""
    leaves = {n: inputs[n].detach().requires_grad_() for n in case.inputs}
    out = case.call(layer, {**inputs, **leaves})
    grads = torch.autograd.grad(out.sin().sum(), [*leaves.values(), *layer.parameters()], allow_unused=True)
    kept = [_masked(g, inputs[case.inputs[n][2]]) if case.inputs[n][2] else g
            for n, g in zip(leaves, grads[:len(leaves)], strict=True)]
    return [out, *kept, *(torch.zeros(()) if g is None else g for g in grads[len(leaves):])]


@pytest.mark.parametrize("junk", ["random", "nan", "inf"])
@pytest.mark.parametrize("impl", list(IMPL_CONFIGS))
def test_padded_positions_change_nothing_at_kept_positions(case, impl, junk):
    layer = build(case, IMPL_CONFIGS[impl])
    inputs = make_inputs(case)
    changed = dict(inputs)
    for i, (name, (_, _, mask_name)) in enumerate(case.inputs.items()):
        if mask_name is not None:
            pad = ~inputs[mask_name][..., None]
            fill = {"random": 100 * torch.randn_like(inputs[name]), "nan": torch.full_like(inputs[name], torch.nan),
                    "inf": torch.full_like(inputs[name], (-1) ** i * torch.inf)}[junk]
            changed[name] = torch.where(pad, fill, inputs[name])
    assert not all(torch.equal(changed[n], inputs[n]) for n in case.inputs)
    expected = _outputs_and_grads(case, layer, inputs)
    got = _outputs_and_grads(case, layer, changed)
    assert all(torch.isfinite(t).all() for t in got)
    assert_close(got, expected)


@pytest.mark.parametrize("impl", list(IMPL_CONFIGS))
def test_fully_masked_sample_is_finite(case, impl):
    layer = build(case, IMPL_CONFIGS[impl])
    inputs = make_inputs(case, requires_grad=True)
    for name in case.masks:
        inputs[name] = inputs[name].clone()
        inputs[name][0] = False
    out = case.call(layer, inputs)
    assert torch.isfinite(out).all()
    leaves = [inputs[n] for n in case.inputs] + list(layer.parameters())
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
