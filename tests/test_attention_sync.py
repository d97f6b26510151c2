"""No host-device synchronisation inside the attention layers and fusions, and inputs checked once.

``.item()``, ``bool(t)``, ``int(t)`` and ``.tolist()`` on a tensor all reach ``aten._local_scalar_dense``,
which on a GPU makes the host wait for every queued kernel. A ``TorchDispatchMode`` records each such
read during forward and backward on CPU; the layers and fusions must make none, and a fusion's entry
check of ``image_index`` exactly one.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmfuse.attention import IMPLS, AttentionConfig, attend
from mmfuse.fusion import available, create
from mmfuse.layers import AttentionBlock, AttentionPooling, CoAttention, CrossAttention, ModalitySelfAttention, common

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_DIM, TEXT_DIM, DIM, HEADS, NI, NT = 12, 10, 16, 4, 9, 5  # NI a square: relational fusions read a grid
CONFIGS = {
    "auto": AttentionConfig("auto"),
    "math": AttentionConfig("math"),
    "chunked": AttentionConfig("chunked", block_q=2, block_k=4),
    "local": AttentionConfig("local", window=3, num_global=1, block_q=2, block_k=4),
    "lowrank": AttentionConfig("lowrank", rank=3),
}


class ScalarReads(TorchDispatchMode):
    """Records where a tensor's value is read back to the host (``aten._local_scalar_dense``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stacks: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.stacks.append("".join(traceback.format_stack(limit=25)))
        return func(*args, **(kwargs or {}))


def reads(fn) -> list[str]:
    with ScalarReads() as mode:
        fn()
    return mode.stacks


def test_the_recorder_sees_item_bool_and_int_in_forward_and_backward():
    class Reads(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            bool(x.any())
            return x * 2

        @staticmethod
        def backward(ctx, g):
            g.sum().item()
            return g * 2

    x = torch.ones(3, requires_grad=True)
    assert len(reads(lambda: (int(x[0]), Reads.apply(x).sum().backward()))) == 3


def test_forward_code_has_no_tolist_or_item():
    """``.tolist()`` reads CPU memory without a dispatched op, so the recorder cannot see it: look for it."""
    import mmfuse

    root = Path(mmfuse.__file__).parent
    files = [root / "attention.py", root / "_attention_blocked.py", root / "fusion.py",
             *sorted((root / "layers").glob("*.py"))]
    found = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
             if ".tolist()" in line or ".item()" in line]
    assert found == []


def padded_batch(B: int = 3, empty_image_row: bool = True):
    """Image/text tokens with padding; sample 1 keeps no image token at all when ``empty_image_row``."""
    image = torch.randn(B, NI, IMAGE_DIM, requires_grad=True)
    text = torch.randn(B, NT, TEXT_DIM, requires_grad=True)
    image_mask = torch.arange(NI)[None, :] < torch.tensor([NI, 0 if empty_image_row else 2, 4][:B])[:, None]
    text_mask = torch.arange(NT)[None, :] < torch.tensor([1, NT, 3][:B])[:, None]
    return image, text, image_mask, text_mask


@pytest.mark.parametrize("impl", IMPLS)
def test_attend_reads_nothing_back_even_with_a_fully_masked_sample(impl):
    q, k, v = (torch.randn(2, 2, n, 4, requires_grad=True) for n in (5, 7, 7))
    mask = torch.tensor([[True] * 4 + [False] * 3, [False] * 7])
    options = {"proj_k": torch.randn(3, 7), "proj_v": torch.randn(3, 7)} if impl == "lowrank" else \
        CONFIGS[impl].options

    with ScalarReads() as mode:
        out, _ = attend(q, k, v, key_padding_mask=mask, impl=impl, dropout_p=0.2, **options)
        out.square().sum().backward()
    assert mode.stacks == [], mode.stacks[0]
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def make_fusion(name: str, impl: str):
    return create(name, image_dim=IMAGE_DIM, text_dim=TEXT_DIM, dim=DIM, num_heads=HEADS, depth=2, dropout=0.1,
                  impl=CONFIGS[impl], max_image_tokens=NI, max_text_tokens=NT)


@pytest.mark.parametrize("impl", list(CONFIGS))
@pytest.mark.parametrize("name", available())
def test_fusion_forward_and_backward_read_nothing_back(name, impl):
    torch.manual_seed(0)
    fusion = make_fusion(name, impl).train()
    image, text, image_mask, text_mask = padded_batch()

    with ScalarReads() as mode:
        out = fusion(image, text, image_mask=image_mask, text_mask=text_mask)
        (out.pooled.square().sum() + (0 if out.tokens is None else out.tokens.sum())).backward()
    assert mode.stacks == [], f"{len(mode.stacks)} reads, the first at\n{mode.stacks[0]}"
    assert torch.isfinite(out.pooled).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in fusion.parameters())


@pytest.mark.parametrize("name", available())
def test_shared_images_cost_one_read_the_entry_check_of_image_index(name):
    fusion = make_fusion(name, "auto").train()
    image, text, image_mask, _ = padded_batch(B=2, empty_image_row=False)
    text = torch.randn(4, NT, TEXT_DIM)
    index = torch.tensor([0, 1, 1, 0])
    with ScalarReads() as mode:
        fusion(image, text, image_mask=image_mask, image_index=index).pooled.sum().backward()
    assert len(device_reads(mode.stacks)) == 1 and "check_inputs" in mode.stacks[0], mode.stacks
    with pytest.raises(ValueError, match=r"context_index values must be in \[0, 2\), got \[0, 2\]"):
        fusion(image, text, image_mask=image_mask, image_index=torch.tensor([0, 1, 2, 0]))


def test_vqa_model_training_step_reads_back_only_the_image_index_check():
    from mmfuse.data import AnswerVocab, WordTokenizer
    from mmfuse.models import VQAConfig, VQAModel

    questions = ["what color is the shape?", "what shape is it?", "is there a red shape?"]
    tokenizer = WordTokenizer.fit(questions)
    config = VQAConfig(num_answers=2, vocab_size=len(tokenizer), cnn_stages=[[8], [16]], dim=16, text_dim=16,
                       num_heads=2, text_heads=2, image_size=32, dropout=0.1)
    model = VQAModel(config, answers=AnswerVocab(["a", "b"]), tokenizer=tokenizer).train()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids, mask = model.tokenize(questions)
    with ScalarReads() as mode:
        model(images, ids, mask, torch.tensor([0, 1, 1])).logsumexp(-1).sum().backward()
    assert len(device_reads(mode.stacks)) == 1 and "check_inputs" in mode.stacks[0], mode.stacks


def device_reads(stacks: list[str]) -> list[str]:
    """The reads that would make a GPU wait: all but the layout of rows by shared image, which reads its size
    on CPU tensors only (``mmfuse.layers.common.context_slots``; on a GPU the keys are gathered instead)."""
    return [s for s in stacks if "context_slots" not in s]


def test_the_layout_by_shared_context_is_for_cpu_tensors_only():
    layer = CrossAttention(DIM, IMAGE_DIM, num_heads=HEADS)
    index = torch.tensor([0, 1, 1, 0])
    assert layer._context_slots(torch.randn(4, NT, DIM), index, 2, NI) is not None
    assert layer._context_slots(torch.randn(4, NT, DIM, device="meta"), index.to("meta"), 2, NI) is None


# --- inputs are checked once, where they enter ---------------------------------------------------------


@pytest.fixture
def check_tokens_calls(monkeypatch) -> list[str]:
    """Count calls of ``check_tokens`` from every module that imported it."""
    calls: list[str] = []
    original = common.check_tokens

    def counting(x, dim, name, **kwargs):
        calls.append(name)
        return original(x, dim, name, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("mmfuse") and getattr(module, "check_tokens", None) is original:
            monkeypatch.setattr(module, "check_tokens", counting)
    return calls


@pytest.mark.parametrize("name", available())
def test_a_fusion_checks_its_two_inputs_once_whatever_its_depth(name, check_tokens_calls):
    fusion = make_fusion(name, "auto")
    image, text, image_mask, text_mask = padded_batch()
    fusion(image, text, image_mask=image_mask, text_mask=text_mask)
    assert sorted(check_tokens_calls) == ["image_tokens", "text_tokens"]


@pytest.mark.parametrize(("layer", "call", "expected"), [
    (lambda: AttentionPooling(IMAGE_DIM, num_queries=3, num_heads=HEADS, depth=3),
     lambda m, image, text: m(image), ["x"]),
    (lambda: CoAttention(TEXT_DIM, IMAGE_DIM, dim=DIM, num_heads=HEADS, depth=3),
     lambda m, image, text: m(text, image), ["image_tokens", "text_tokens"]),
    (lambda: ModalitySelfAttention(IMAGE_DIM, TEXT_DIM, dim=DIM, num_heads=HEADS, depth=3),
     lambda m, image, text: m(image, text), ["image_tokens", "text_tokens"]),
    (lambda: AttentionBlock(TEXT_DIM, context_dim=IMAGE_DIM, num_heads=2),
     lambda m, image, text: m(text, image), ["context", "x"]),
    (lambda: CrossAttention(TEXT_DIM, IMAGE_DIM, num_heads=2),
     lambda m, image, text: m(text, image), ["context", "x"]),
])
def test_a_layer_checks_its_inputs_once_not_in_its_blocks(layer, call, expected, check_tokens_calls):
    image, text, _, _ = padded_batch()
    call(layer(), image, text)
    assert sorted(check_tokens_calls) == expected


def test_shape_errors_still_name_the_shapes_at_the_entry():
    fusion = make_fusion("fusion_transformer", "auto")
    image, text, image_mask, _ = padded_batch()
    with pytest.raises(ValueError, match=r"text_tokens must have shape \(3, Nt, 10\), got \(3, 5, 11\)"):
        fusion(image, torch.randn(3, NT, TEXT_DIM + 1))
    with pytest.raises(ValueError, match=r"image_mask must have shape \(B, N\) = \(3, 9\), got \(3, 5\)"):
        fusion(image, text, image_mask=image_mask[:, :5])
    with pytest.raises(ValueError, match=r"image_tokens must have shape \(3, Ni, 12\), got \(3, 9, 5\)"):
        CoAttention(TEXT_DIM, IMAGE_DIM, dim=DIM, num_heads=HEADS)(text, image[..., :5])
