"""The fusion registry: every fusion on a padded batch, and what sets attention fusions apart."""

import re

import pytest
import torch
from torch.testing import assert_close

from mmfuse import fusion
from mmfuse.fusion import FusionOutput, available, create

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_DIM, TEXT_DIM, DIM, HEADS = 12, 10, 16, 4
BASELINES = ["concat", "late", "product", "text_only", "image_only"]
ATTENTION = ["cross_attention", "attention_pooling", "self_attention", "gated_cross_attention",
             "fusion_transformer"]


def make(name, **kwargs):
    return create(name, image_dim=IMAGE_DIM, text_dim=TEXT_DIM, dim=DIM, num_heads=HEADS, depth=2, **kwargs)


def batch(B=3, Ni=6, Nt=4, requires_grad=False):
    """A padded batch: samples keep different numbers of image and text tokens."""
    image = torch.randn(B, Ni, IMAGE_DIM, requires_grad=requires_grad)
    text = torch.randn(B, Nt, TEXT_DIM, requires_grad=requires_grad)
    image_mask = torch.arange(Ni)[None, :] < torch.tensor([Ni, 2, 4])[:, None]
    text_mask = torch.arange(Nt)[None, :] < torch.tensor([1, Nt, 3])[:, None]
    return image, text, image_mask, text_mask


def open_gates(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-1].startswith("gate_"):
                p.fill_(0.7)
    return module


# The relational fusions need a square grid of image tokens: tests/layers/test_relational.py.
RELATIONAL = ["film", "multi_hop", "relation_network", "relational_transformer"]


def test_available_lists_every_fusion():
    assert available() == sorted(BASELINES + ATTENTION + RELATIONAL)


@pytest.mark.parametrize("name", BASELINES + ATTENTION)
def test_forward_backward_on_padded_batch(name):
    model = make(name).train()
    image, text, image_mask, text_mask = batch(requires_grad=True)
    out = model(image, text, image_mask=image_mask, text_mask=text_mask)
    assert isinstance(out, FusionOutput)
    assert out.pooled.shape == (3, model.out_dim) and model.out_dim == DIM
    assert out.attention is None
    loss = out.pooled.square().sum() + (0 if out.tokens is None else out.tokens.sum())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    for t in (image, text):
        assert t.grad is None or torch.isfinite(t.grad).all()


@pytest.mark.parametrize("name", BASELINES + ATTENTION)
def test_padded_positions_change_nothing(name):
    model = open_gates(make(name)).eval()
    image, text, image_mask, text_mask = batch()
    out = model(image, text, image_mask=image_mask, text_mask=text_mask)
    image2 = torch.where(image_mask[..., None], image, 100 * torch.randn_like(image))
    text2 = torch.where(text_mask[..., None], text, 100 * torch.randn_like(text))
    assert_close(model(image2, text2, image_mask=image_mask, text_mask=text_mask).pooled, out.pooled)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cross_attention", (3, HEADS, 4, 6)),
        ("gated_cross_attention", (3, HEADS, 4, 6)),
        ("fusion_transformer", (3, HEADS, 4, 6)),
        ("attention_pooling", (3, HEADS, 5, 6 + 4)),
        ("self_attention", (3, HEADS, 6 + 4, 6 + 4)),
    ],
)
def test_attention_weights_when_asked(name, shape):
    model = make(name, **({"num_queries": 5} if name == "attention_pooling" else {})).eval()
    image, text, image_mask, text_mask = batch()
    out = model(image, text, image_mask=image_mask, text_mask=text_mask, need_weights=True)
    assert out.attention.shape == shape
    kept_keys = image_mask if shape[-1] == 6 else torch.cat([image_mask, text_mask], dim=1)
    assert (out.attention.masked_select(~kept_keys[:, None, None, :]) == 0).all()
    # The weights come from the same forward pass as the outputs.
    assert_close(model(image, text, image_mask=image_mask, text_mask=text_mask).pooled, out.pooled)


LAYOUT_SHAPES = {  # (Nq, Nk) of each declared layout, for Ni = 6 image and Nt = 4 text tokens, Q = 5
    fusion.TEXT_TO_IMAGE: (4, 6),
    fusion.LATENTS_TO_TOKENS: (5, 6 + 4),
    fusion.TOKENS_TO_TOKENS: (6 + 4, 6 + 4),
}


@pytest.mark.parametrize("name", BASELINES + ATTENTION)
def test_each_fusion_declares_the_layout_of_its_attention(name):
    """``attention_layout`` is what reports read: it must describe the weights the fusion returns."""
    model = make(name, **({"num_queries": 5} if name == "attention_pooling" else {})).eval()
    assert type(model) is fusion.get(name) and model.attention_layout == fusion.get(name).attention_layout
    out = model(*batch()[:2], need_weights=True)
    if model.attention_layout is None:
        assert name in BASELINES and out.attention is None
    else:
        assert name in ATTENTION and out.attention.shape == (3, HEADS, *LAYOUT_SHAPES[model.attention_layout])


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_fusions_see_each_image_token(name):
    """Replacing the image tokens by their mean changes the output: the context is not one vector."""
    model = open_gates(make(name)).eval()
    image, text, _, _ = batch()
    mean_image = image.mean(dim=1, keepdim=True).expand_as(image)
    assert not torch.allclose(model(mean_image, text).pooled, model(image, text).pooled, atol=1e-4)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_see_only_the_mean_image(name):
    model = make(name).eval()
    image, text, _, _ = batch()
    mean_image = image.mean(dim=1, keepdim=True).expand_as(image)
    assert_close(model(mean_image, text).pooled, model(image, text).pooled)


def test_gated_fusion_ignores_the_image_until_its_gates_open():
    model = make("gated_cross_attention").eval()
    image, text, _, _ = batch()
    assert_close(model(torch.randn_like(image), text).pooled, model(image, text).pooled)


def test_late_fusion_averages_two_unimodal_heads():
    late = make("late").eval()
    image, text, image_mask, text_mask = batch()
    text_only, image_only = make("text_only").eval(), make("image_only").eval()
    text_only.text_head.load_state_dict(late.text_head.state_dict())
    image_only.image_head.load_state_dict(late.image_head.state_dict())
    classifier = torch.nn.Linear(DIM, 7)
    inputs = {"image_mask": image_mask, "text_mask": text_mask}
    logits = classifier(late(image, text, **inputs).pooled)
    unimodal = [classifier(m(image, text, **inputs).pooled) for m in (text_only, image_only)]
    assert_close(logits, (unimodal[0] + unimodal[1]) / 2)


def test_attention_pooling_returns_its_latents():
    out = make("attention_pooling", num_queries=7)(*batch()[:2])
    assert out.tokens.shape == (3, 7, DIM)
    assert_close(out.pooled, out.tokens.mean(dim=1))


def test_create_rejects_unknown_names_listing_the_choices():
    with pytest.raises(ValueError, match=re.escape(f"unknown fusion 'nope'; choose one of {available()}")):
        make("nope")


def test_create_ignores_unused_common_arguments_but_rejects_unknown_ones():
    assert make("concat", impl="math").out_dim == DIM
    with pytest.raises(TypeError, match=r"'concat' got unexpected arguments \['num_queries'\]"):
        make("concat", num_queries=4)
    with pytest.raises(TypeError, match=r"unexpected arguments \['typo'\]"):
        make("cross_attention", typo=1)


def test_create_passes_the_common_arguments():
    model = make("cross_attention", impl="math", dropout=0.25)
    assert len(model.blocks) == 2
    assert model.blocks[0].cross_attn.num_heads == HEADS
    assert model.blocks[0].cross_attn.attn.impl == "math"
    assert model.blocks[0].cross_attn.attn.dropout == 0.25


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        fusion.register("concat")(fusion.ConcatFusion)


@pytest.mark.parametrize("name", ["concat", "cross_attention"])
def test_wrong_shapes_name_expected_and_received(name):
    model = make(name)
    image, text, image_mask, _ = batch()
    with pytest.raises(ValueError,
                       match=re.escape("image_tokens must have shape (B, Ni, 12), got (3, 6, 10)")):
        model(text.new_zeros(3, 6, 10), text)
    with pytest.raises(ValueError,
                       match=re.escape("text_tokens must have shape (3, Nt, 10), got (3, 4, 12)")):
        model(image, text.new_zeros(3, 4, 12))
    with pytest.raises(ValueError, match=re.escape("image_mask must have shape (B, N) = (3, 6), got (3, 4)")):
        model(image, text, image_mask=image_mask[:, :4])


@pytest.mark.parametrize("name", BASELINES + ATTENTION)
def test_shared_images_equal_gathering_first(name):
    """image_index: one row of image tokens per image, shared by several questions, gives exactly what
    gathering the rows per question first gives (outputs and gradients)."""
    model = open_gates(make(name)).eval()
    image, _, image_mask, _ = batch(B=3)
    text = torch.randn(5, 4, TEXT_DIM)
    text_mask = torch.arange(4)[None, :] < torch.tensor([4, 1, 3, 2, 4])[:, None]
    index = torch.tensor([2, 0, 2, 1, 0])
    shared_image = image.clone().requires_grad_()
    gathered_image = image.clone().requires_grad_()
    shared = model(shared_image, text, image_mask=image_mask, text_mask=text_mask, image_index=index,
                   need_weights=True)
    gathered = model(gathered_image[index], text, image_mask=image_mask[index], text_mask=text_mask,
                     need_weights=True)
    assert_close(shared.pooled, gathered.pooled)
    if gathered.attention is not None:
        assert_close(shared.attention, gathered.attention)
    shared.pooled.sum().backward()
    gathered.pooled.sum().backward()
    assert_close(shared_image.grad, gathered_image.grad)


def test_image_index_out_of_range_is_rejected():
    model = make("cross_attention")
    image, text, _, _ = batch(B=3)
    with pytest.raises(ValueError, match=r"context_index values must be in \[0, 3\)"):
        model(image, text, image_index=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"context_index must be int64 of shape \(3,\)"):
        model(image, text, image_index=torch.tensor([0, 1]))
