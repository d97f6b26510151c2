"""Relational layers and fusions: coordinates, image self-attention, the relation network against a
pair-by-pair reference, masks, shared images, registry, and a few training steps."""

from __future__ import annotations

import re

import pytest
import torch
from torch.testing import assert_close

from mmfuse import fusion
from mmfuse.layers.relational import (
    FiLMReadout,
    MultiHopReader,
    RelationalTransformer,
    RelationNetwork,
    append_coordinates,
    grid_coordinates,
)

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_DIM, TEXT_DIM, DIM, HEADS = 12, 10, 16, 4
NAMES = ["relational_transformer", "relation_network", "film", "multi_hop"]


def make(name: str, **kwargs) -> fusion.Fusion:
    return fusion.create(name, image_dim=IMAGE_DIM, text_dim=TEXT_DIM, dim=DIM, num_heads=HEADS, depth=2,
                         dropout=0.0, **kwargs)


def batch(I: int = 3, N: int = 9, B: int = 5, Nt: int = 4):
    """I images of N = 3 x 3 tokens, B questions over them, some tokens padded."""
    image = torch.randn(I, N, IMAGE_DIM)
    text = torch.randn(B, Nt, TEXT_DIM)
    image_mask = torch.arange(N)[None, :] < torch.tensor([N, 5, 7])[:I, None]
    text_mask = torch.arange(Nt)[None, :] < torch.tensor([4, 1, 3, 2, 4])[:B, None]
    index = torch.tensor([2, 0, 2, 1, 0])[:B]
    return image, text, image_mask, text_mask, index


def test_grid_coordinates_are_cell_centres_row_major():
    c = grid_coordinates(4)
    assert_close(c, torch.tensor([[-0.5, -0.5, 0.5], [0.5, -0.5, 0.5], [-0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    c = grid_coordinates(25)
    assert_close(c[12], torch.tensor([0.0, 0.0, 0.0]))  # centre of a 5 x 5 grid
    assert_close(c[:, 0].unique(), torch.tensor([-0.8, -0.4, 0.0, 0.4, 0.8]))
    with pytest.raises(ValueError, match=re.escape("square grid (N = h * h), got N = 6")):
        grid_coordinates(6)
    x = torch.randn(2, 9, 5)
    out = append_coordinates(x)
    assert out.shape == (2, 9, 8) and torch.equal(out[..., :5], x) and torch.equal(out[1, :, 5:], grid_coordinates(9))


def test_registered_and_buildable_by_name():
    assert set(NAMES) <= set(fusion.available())
    assert isinstance(make("relational_transformer", image_depth=1).encoder, RelationalTransformer)
    assert isinstance(make("relation_network").rn, RelationNetwork)
    assert isinstance(make("film", image_depth=0).readout, FiLMReadout)
    assert isinstance(make("multi_hop").reader, MultiHopReader) and make("multi_hop").reader.hops == 2
    with pytest.raises(TypeError, match="unexpected arguments"):
        make("relation_network", image_depth=2)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_every_parameter(name):
    model = make(name).train()
    image, text, image_mask, text_mask, index = batch()
    image.requires_grad_()
    out = model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index)
    assert out.pooled.shape == (5, DIM) and model.out_dim == DIM
    out.pooled.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    assert image.grad[image_mask].abs().sum() > 0 and (image.grad[~image_mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_padded_positions_change_nothing(name):
    model = make(name).eval()
    image, text, image_mask, text_mask, index = batch()
    out = model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index).pooled
    image2 = torch.where(image_mask[..., None], image, 100 * torch.randn_like(image))
    text2 = torch.where(text_mask[..., None], text, 100 * torch.randn_like(text))
    assert_close(model(image2, text2, image_mask=image_mask, text_mask=text_mask, image_index=index).pooled, out)


@pytest.mark.parametrize("name", NAMES)
def test_shared_images_equal_gathering_first(name):
    model = make(name).eval()
    image, text, image_mask, text_mask, index = batch()
    shared = model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index, need_weights=True)
    gathered = model(image[index], text, image_mask=image_mask[index], text_mask=text_mask, need_weights=True)
    assert_close(shared.pooled, gathered.pooled)
    if name in ("relational_transformer", "multi_hop"):
        rows = 4 if name == "relational_transformer" else 2  # text tokens; hops
        assert shared.attention.shape == (5, HEADS, rows, 9)
        assert_close(shared.attention, gathered.attention)
        assert (shared.attention.masked_select(~image_mask[index][:, None, None, :]) == 0).all()
        assert_close(shared.attention.sum(-1), torch.ones(5, HEADS, rows))


@pytest.mark.parametrize("name, options", [(n, {}) for n in NAMES] + [("multi_hop", {"distance_bias": True})])
def test_shared_images_give_the_gradients_of_gathering_first(name, options):
    """On CPU the questions may be laid out by image (multi_hop): its backward must match the gathered one."""
    model = make(name, **options).double()
    for m in getattr(getattr(model, "reader", None), "distance_scale", ()):
        torch.nn.init.normal_(m.weight)  # zero at initialisation: give the distance term a gradient to check
    image, text, image_mask, text_mask, index = batch()
    image, text = image.double().requires_grad_(), text.double().requires_grad_()
    inputs = [image, text, *model.parameters()]
    probe = torch.randn(5, DIM, dtype=torch.double)

    def grads(out):
        return torch.autograd.grad((out.pooled * probe).sum(), inputs, allow_unused=True)

    shared = grads(model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index))
    gathered = grads(model(image[index], text, image_mask=image_mask[index], text_mask=text_mask))
    for a, b in zip(shared, gathered, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("coordinates", [True, False])
def test_coordinates_make_token_order_matter(name, coordinates):
    """Without coordinates both fusions are blind to where a token is (a permutation of the image tokens
    changes nothing); with them, the same contents at other positions give another answer."""
    model = make(name, coordinates=coordinates).eval()
    image, text, _, _, index = batch()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    out, permuted = model(image, text, image_index=index).pooled, model(image[:, perm], text, image_index=index).pooled
    if coordinates:
        assert not torch.allclose(out, permuted, atol=1e-4)
    else:
        assert_close(out, permuted)


@pytest.mark.parametrize("image_depth", [0, 2])
@pytest.mark.parametrize("name", ["relational_transformer", "film"])
def test_image_self_attention_lets_tokens_see_each_other(name, image_depth):
    model = make(name, image_depth=image_depth).eval()
    enc = model.encoder.image if name == "relational_transformer" else model.readout.image
    image = torch.randn(1, 9, IMAGE_DIM)
    changed = image.clone()
    changed[0, 8] += 3.0
    a, b = enc(image), enc(changed)
    assert torch.allclose(a[0, :8], b[0, :8]) == (image_depth == 0)


def test_relation_network_equals_pair_by_pair_reference():
    torch.manual_seed(0)
    rn = RelationNetwork(IMAGE_DIM, TEXT_DIM, dim=DIM, g_layers=3, out_dim=7).double()
    objects = torch.randn(2, 4, IMAGE_DIM, dtype=torch.double)
    question = torch.randn(3, TEXT_DIM, dtype=torch.double)
    index = torch.tensor([1, 0, 1])
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    # g's first layer on the explicit concatenation [o_i; o_j; q], as in the paper
    w = torch.cat([rn.g_left.weight, rn.g_right.weight, rn.g_question.weight], dim=1)
    expected = []
    for b in range(3):
        o = append_coordinates(objects)[index[b]]
        total = 0
        for i in range(4):
            for j in range(4):
                if mask[index[b], i] and mask[index[b], j]:
                    h = torch.relu(w @ torch.cat([o[i], o[j], question[b]]) + rn.g_left.bias)
                    for layer in rn.g_rest:
                        h = torch.relu(layer(h))
                    total = total + h
        expected.append(rn.f(total))
    assert_close(rn(objects, question, object_mask=mask, object_index=index), torch.stack(expected))
    assert torch.autograd.gradcheck(lambda o, q: rn(o, q, object_mask=mask, object_index=index),
                                    (objects.requires_grad_(), question.requires_grad_()))


def test_relation_network_rejects_bad_shapes():
    rn = RelationNetwork(IMAGE_DIM, TEXT_DIM, dim=DIM)
    with pytest.raises(ValueError, match=re.escape(f"question must have shape (B, {TEXT_DIM}), got (3, 4)")):
        rn(torch.randn(3, 9, IMAGE_DIM), torch.randn(3, 4))
    with pytest.raises(ValueError, match="2 object sets for 3 questions: pass object_index"):
        rn(torch.randn(2, 9, IMAGE_DIM), torch.randn(3, TEXT_DIM))
    with pytest.raises(ValueError, match=re.escape(f"objects must have shape (B, N, {IMAGE_DIM}), got (2, 9, 5)")):
        rn(torch.randn(2, 9, 5), torch.randn(2, TEXT_DIM))


@pytest.mark.parametrize("name", NAMES)
def test_learns_a_positional_relation_in_a_few_steps(name):
    """Which of two marked tokens is further right: a relation between positions, not contents."""
    torch.manual_seed(0)
    model = make(name, **({} if name in ("relation_network", "multi_hop") else {"image_depth": 1}))
    head = torch.nn.Linear(DIM, 2)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    text = torch.zeros(32, 1, TEXT_DIM)

    def sample():
        image = torch.zeros(32, 9, IMAGE_DIM)
        a, b = torch.randint(0, 9, (2, 32))
        b = torch.where(a % 3 == b % 3, (b + 1) % 9, b)  # different columns
        image[torch.arange(32), a, 0] = 1.0
        image[torch.arange(32), b, 1] = 1.0
        return image, (a % 3 > b % 3).long()

    losses = []
    for _ in range(60):
        image, y = sample()
        loss = torch.nn.functional.cross_entropy(head(model(image, text).pooled), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_question_query_sends_one_token_per_question():
    model = make("relational_transformer", question_query=True).eval()
    image, text, image_mask, text_mask, index = batch()
    out = model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index, need_weights=True)
    assert out.tokens.shape == (5, 1, DIM) and out.attention.shape == (5, HEADS, 1, 9)
    assert_close(out.pooled, out.tokens[:, 0])
    # the query is the masked mean of the text tokens: padding and the order of kept tokens do not matter
    text2 = torch.where(text_mask[..., None], text, 100 * torch.randn_like(text))
    text2[0] = text2[0].flip(0)  # row 0 keeps all 4 tokens
    assert_close(model(image, text2, image_mask=image_mask, text_mask=text_mask, image_index=index).pooled,
                 out.pooled)
    gathered = model(image[index], text, image_mask=image_mask[index], text_mask=text_mask)
    assert_close(gathered.pooled, out.pooled)


def test_film_pools_the_max_over_kept_tokens_and_starts_unconditioned():
    model = make("film").eval()
    image, text, image_mask, text_mask, index = batch()
    out = model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index)
    kept = out.tokens.masked_fill(~image_mask[index][..., None], float("-inf"))
    assert_close(out.pooled, kept.amax(dim=1))
    # gamma = beta = 0 at initialisation: every question about an image gets the same vector
    assert_close(out.pooled[0], out.pooled[2])
    with torch.no_grad():
        model.readout.film.weight.normal_()
    out = model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index)
    assert not torch.allclose(out.pooled[0], out.pooled[2])
    empty = torch.zeros_like(image_mask)
    assert (model(image, text, image_mask=empty, text_mask=text_mask, image_index=index).pooled == 0).all()


def test_film_hops_condition_each_hop_on_the_ones_before():
    model = make("film", hops=2, image_depth=0).eval()
    readout = model.readout
    assert len(readout.next_films) == 1 and readout.next_films[0].in_features == TEXT_DIM + DIM
    image, text, image_mask, text_mask, index = batch()
    out = model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index)
    assert out.pooled.shape == (5, DIM) and out.tokens.shape == (5, 9, DIM)
    # Only the second hop's conditioning is switched on: what it reads now depends on the first hop's max.
    with torch.no_grad():
        readout.next_films[0].weight[:, TEXT_DIM:].normal_()
    changed = image.clone()
    changed[0, 0] += 5.0  # image 0 is question 1's and question 4's
    before = model(image, text, image_mask=image_mask, text_mask=text_mask, image_index=index).tokens
    after = model(changed, text, image_mask=image_mask, text_mask=text_mask, image_index=index).tokens
    moved = ~torch.isclose(before, after).all(dim=-1)  # (5, 9): tokens whose second-hop features changed
    assert moved[[1, 4]].sum() > 2  # beyond token 0 itself: the first hop's pooled vector carried the change
    assert not moved[[0, 2, 3]].any()
    with pytest.raises(ValueError, match="hops must be >= 1, got 0"):
        make("film", hops=0)



def _land_hop_one_on_token_7(reader: MultiHopReader, image: torch.Tensor) -> None:
    """Set ``reader`` and the (1, 9, IMAGE_DIM) ``image`` so that every head of hop 1 has logits
    50 * (feature 0 of the token), feature 0 one-hot at token 7: hop 1 lands on token 7."""
    with torch.no_grad():
        image[..., 0] = 0.0
        image[0, 7, 0] = 1.0
        reader.image[0].weight.zero_()
        reader.image[0].weight[0, 0] = 1.0  # (before the LayerNorm) token 7 differs from the others in unit 0
        reader.coord_keys.weight.zero_()
        reader.keys.weight.zero_()
        reader.keys.bias.zero_()
        reader.keys.weight[:DIM, 0] = 1.0  # hop 1's keys: unit 0 in every head dimension
        reader.queries[0].weight.zero_()
        reader.queries[0].bias.fill_(50.0)


def test_multi_hop_reads_positions_and_counts_from_its_weights():
    """Each hop's read carries, per head, the attention-weighted grid coordinates (exactly) and the
    sigmoid sum of the logits; a first hop that lands on one token hands its position to the second."""
    torch.manual_seed(0)
    reader = MultiHopReader(IMAGE_DIM, TEXT_DIM, dim=DIM, num_heads=HEADS, hops=2).eval()
    image, text = torch.randn(1, 9, IMAGE_DIM), torch.randn(1, 2, TEXT_DIM)
    _land_hop_one_on_token_7(reader, image)
    _, weights = reader(image, text)
    assert weights.shape == (1, HEADS, 2, 9)
    assert weights[0, :, 0, 7].min() > 0.999  # every head of hop 1 is on token 7
    memory = {}
    reader.controls[1].register_forward_hook(lambda m, args, out: memory.update(cat=args[0]))
    reader(image, text)
    read = memory["cat"][0, DIM:]  # hop 1's read: [values (DIM); where (HEADS * 3); counts (HEADS)]
    where = read[DIM:DIM + HEADS * 3].view(HEADS, 3)
    assert_close(where, grid_coordinates(9)[7].expand(HEADS, 3), atol=1e-3, rtol=0)
    # the soft count: token 7's sigmoid (~1) and eight sigmoid(0) = 0.5, over 9 tokens
    assert_close(read[DIM + HEADS * 3:], torch.full((HEADS,), 5 / 9), atol=1e-3, rtol=0)
    reader.count_unit = 2.0  # the same sum, in units of two tokens
    reader(image, text)
    assert_close(memory["cat"][0, 2 * DIM + HEADS * 3:], torch.full((HEADS,), 5 / 2), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="hops must be >= 1, got 0"):
        MultiHopReader(IMAGE_DIM, TEXT_DIM, hops=0)
    with pytest.raises(ValueError, match="count_unit must be positive"):
        MultiHopReader(IMAGE_DIM, TEXT_DIM, count_unit=0)


def test_multi_hop_distance_bias_scores_tokens_by_their_distance_from_an_earlier_read():
    """From hop 2 on, distance_bias adds s * |p_i - m|^2 (grid cells) to the logits, m a point an earlier
    hop read: s < 0 draws the hop to where hop 1 landed, s > 0 to the tokens furthest from it. At
    initialisation s = 0: the reader computes what it computes without the term."""
    torch.manual_seed(0)
    plain = MultiHopReader(IMAGE_DIM, TEXT_DIM, dim=DIM, num_heads=HEADS, hops=2).eval()
    reader = MultiHopReader(IMAGE_DIM, TEXT_DIM, dim=DIM, num_heads=HEADS, hops=2, distance_bias=True).eval()
    missing, unexpected = reader.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and {k.split(".")[0] for k in missing} == {"reference", "distance_scale"}
    image, text = torch.randn(1, 9, IMAGE_DIM), torch.randn(1, 2, TEXT_DIM)
    assert_close(reader(image, text), plain(image, text))
    _land_hop_one_on_token_7(reader, image)
    with torch.no_grad():  # hop 2's own query reads nothing
        reader.queries[1].weight.zero_()
        reader.queries[1].bias.zero_()
    centre = grid_coordinates(9)[7, :2]  # (0, 2/3): bottom row, middle column
    squared = (grid_coordinates(9)[:, :2] - centre).mul(1.5).square().sum(-1)  # 3 x 3 grid: 1.5 cells per unit
    memory = {}
    reader.readout.register_forward_hook(lambda m, args, out: memory.update(cat=args[0]))
    for scale in (-4.0, 4.0):
        with torch.no_grad():
            reader.distance_scale[0].bias.fill_(scale)
        _, weights = reader(image, text)
        assert_close(weights[0, :, 1], (scale * squared).softmax(-1).expand(HEADS, 9))
        # hop 2's soft counts come from its content logits (all 0 here: sigmoid 0.5), not the distance term
        assert_close(memory["cat"][0, -HEADS:], torch.full((HEADS,), 0.5))
    assert weights[0, :, 1, [0, 2]].min() > 0.49  # "furthest": the two top corners
