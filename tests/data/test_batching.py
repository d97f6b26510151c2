from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfuse.data import AnswerVocab, Batch, ImageGroupedBatches, VQASplit, encode_answers


def make_split(counts: list[int], *, size: int = 2, seed: int = 0) -> VQASplit:
    """Image m gets counts[m] questions; questions are shuffled so an image's questions are not adjacent.

    Every image has its own uniform colour (its row number), question i has i % 5 + 1 words.
    """
    g = torch.Generator().manual_seed(seed)
    image_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    image_index = image_index[torch.randperm(len(image_index), generator=g)]
    n = len(image_index)
    images = torch.arange(len(counts), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, size, size)
    return VQASplit(
        images=images.contiguous(),
        image_index=image_index,
        questions=[" ".join(["w"] * (i % 5 + 1)) for i in range(n)],
        answers=[f"a{i % 3}" for i in range(n)],
        answer_types=None,
        image_paths=[f"{m}.png" for m in range(len(counts))],
        name="synthetic",
    )


def encoded(split: VQASplit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids unique to each question (id = 100 * question + position) and their mask, padded to 8."""
    n = len(split)
    lengths = torch.tensor([len(q.split()) + 1 for q in split.questions], dtype=torch.long)
    mask = torch.arange(8) < lengths[:, None]  # (N, 8)
    tokens = (torch.arange(n)[:, None] * 100 + torch.arange(8)) * mask  # (N, 8), 0 = padding
    return tokens, mask, torch.arange(n) % 7


def batches_of(split: VQASplit, **kwargs) -> ImageGroupedBatches:
    return ImageGroupedBatches(split, *encoded(split), **kwargs)


def check_batch(split: VQASplit, batch: Batch, max_images: int) -> None:
    tokens, mask, answers = encoded(split)
    q = batch.question_ids
    rows = split.image_index[q]  # (Q,) each question's image in the split
    batch_rows = batch.images[:, 0, 0, 0].long()  # every image is coloured with its row number
    assert 0 < len(batch.images) <= max_images
    assert len(set(batch_rows.tolist())) == len(batch_rows)  # each image once
    assert torch.equal(batch_rows[batch.image_index], rows)  # image_index points at the right image
    # all questions of every image in the batch are in the batch
    questions_of_batch_images = torch.isin(split.image_index, batch_rows).nonzero().squeeze(1)
    assert sorted(q.tolist()) == questions_of_batch_images.tolist()
    # tokens, mask and answers are the question's own, trimmed to the batch's longest question
    length = int(mask[q].sum(1).max())
    assert batch.tokens.shape == batch.text_mask.shape == (len(q), length)
    assert torch.equal(batch.tokens, tokens[q, :length]) and torch.equal(batch.text_mask, mask[q, :length])
    assert torch.equal(batch.answers, answers[q])
    assert batch.images.dtype == torch.uint8
    for t in (batch.image_index, batch.tokens, batch.answers, batch.question_ids):
        assert t.dtype == torch.long


COUNTS = [3, 1, 0, 7, 2, 2, 5, 1, 4, 10, 1, 1, 6]  # image 2 has no question


def test_every_question_once_per_epoch_grouped_by_image():
    split = make_split(COUNTS)
    sampler = batches_of(split, images_per_batch=5)
    batches = list(sampler.epoch(0))
    assert len(batches) == len(sampler) == 3  # 12 images with questions, 5 a batch
    for batch in batches:
        check_batch(split, batch, max_images=5)
    seen = torch.cat([b.question_ids for b in batches])
    assert sorted(seen.tolist()) == list(range(len(split)))
    assert 2 not in torch.cat([b.images[:, 0, 0, 0] for b in batches]).tolist()  # question-less image


def test_same_seed_and_epoch_same_batches_else_different():
    split = make_split(COUNTS)

    def order(sampler, epoch):
        return [b.question_ids.tolist() for b in sampler.epoch(epoch)]

    a, b = batches_of(split, images_per_batch=4, seed=3), batches_of(split, images_per_batch=4, seed=3)
    assert order(a, 5) == order(b, 5)
    assert order(a, 5) != order(a, 6)
    assert order(a, 5) != order(batches_of(split, images_per_batch=4, seed=4), 5)
    unshuffled = batches_of(split, images_per_batch=4, shuffle=False)
    assert order(unshuffled, 0) == order(unshuffled, 1)
    assert unshuffled.image_order(0).tolist() == [0, 1, *range(3, 13)]


@pytest.mark.parametrize("start", [0, 1, 3, 4, 9])
def test_resume_from_start_gives_the_tail(start):
    split = make_split(COUNTS)
    sampler = batches_of(split, images_per_batch=3, seed=11)
    full = [b.question_ids.tolist() for b in sampler.epoch(2)]
    assert len(full) == 4
    assert [b.question_ids.tolist() for b in sampler.epoch(2, start=start)] == full[start:]
    with pytest.raises(ValueError, match="start"):
        next(sampler.epoch(2, start=-1))


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_ranks_get_disjoint_images_and_equal_batch_counts(world_size):
    split = make_split(COUNTS)  # 12 images with questions
    ranks = [batches_of(split, images_per_batch=2, seed=1, rank=r, world_size=world_size)
             for r in range(world_size)]
    per_rank = 12 // world_size
    assert {len(r) for r in ranks} == {-(-per_rank // 2)}
    images = []
    for sampler in ranks:
        batches = list(sampler.epoch(4))
        assert len(batches) == len(sampler)
        for batch in batches:
            check_batch(split, batch, max_images=2)
        images.append(torch.cat([b.images[:, 0, 0, 0] for b in batches]).tolist())
    flat = [m for rank_images in images for m in rank_images]
    assert all(len(rank_images) == per_rank for rank_images in images)
    assert len(set(flat)) == len(flat) == per_rank * world_size  # disjoint; < world_size left out


def test_drop_last_keeps_only_full_batches():
    split = make_split(COUNTS)
    sampler = batches_of(split, images_per_batch=5, drop_last=True)
    batches = list(sampler.epoch(0))
    assert len(sampler) == len(batches) == 2 and all(len(b.images) == 5 for b in batches)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=30),
    images_per_batch=st.integers(1, 8),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 1000),
)
def test_partition_property(counts, images_per_batch, world_size, seed, epoch):
    split = make_split(counts)
    used = sum(c > 0 for c in counts)
    seen = []
    for rank in range(world_size):
        sampler = batches_of(split, images_per_batch=images_per_batch, seed=seed, rank=rank,
                             world_size=world_size)
        for batch in sampler.epoch(epoch):
            check_batch(split, batch, max_images=images_per_batch)
            seen += batch.question_ids.tolist()
    assert len(seen) == len(set(seen))  # no question twice, across ranks too
    if world_size == 1 or used % world_size == 0:
        assert sorted(seen) == list(range(len(split)))


def test_batch_to_moves_every_field():
    split = make_split(COUNTS)
    batch = next(batches_of(split).epoch(0)).to("meta")
    assert all(getattr(batch, f).device.type == "meta" for f in
               ("images", "image_index", "tokens", "text_mask", "answers", "question_ids"))


def test_encode_answers_unknown_is_minus_one():
    vocab = AnswerVocab(["red", "blue"])
    out = encode_answers(["red", "blue", "purple"], vocab)
    assert out.dtype == torch.long and out.tolist() == [1, 0, -1]


def test_bad_arguments():
    split = make_split([2, 1])
    tokens, mask, answers = encoded(split)
    with pytest.raises(ValueError, match=r"\(N, L\) with N = 3"):
        ImageGroupedBatches(split, tokens[:2], mask[:2], answers)
    with pytest.raises(ValueError, match="bool"):
        ImageGroupedBatches(split, tokens, mask.long(), answers)
    with pytest.raises(ValueError, match=r"answers must be \(N,\)"):
        ImageGroupedBatches(split, tokens, mask, answers[:1])
    with pytest.raises(ValueError, match="images_per_batch"):
        ImageGroupedBatches(split, tokens, mask, answers, images_per_batch=0)
    with pytest.raises(ValueError, match="rank"):
        ImageGroupedBatches(split, tokens, mask, answers, rank=2, world_size=2)


def test_an_image_with_more_questions_than_a_batch_holds_is_split_across_steps():
    split = make_split([3, 100, 2, 1], size=2)
    tokens, mask, answers = encoded(split)
    batches = ImageGroupedBatches(split, tokens, mask, answers, images_per_batch=2, max_questions=20, seed=3)
    seen: list[int] = []
    for batch in batches.epoch(0):
        assert len(batch) <= 20
        # an image is gathered once per batch, whichever of its units the batch holds
        assert batch.images.shape[0] == len(set(batch.images[:, 0, 0, 0].tolist()))
        rows = batch.images[batch.image_index, 0, 0, 0]  # each question's image (its colour is its row)
        assert rows.tolist() == split.image_index[batch.question_ids].tolist()
        seen += batch.question_ids.tolist()
    assert sorted(seen) == list(range(len(split))), "every question once per epoch"


def test_without_oversized_images_the_cap_changes_nothing():
    split = make_split([3, 5, 2, 4, 1, 6])
    tokens, mask, answers = encoded(split)
    capped = ImageGroupedBatches(split, tokens, mask, answers, images_per_batch=2, max_questions=12, seed=1)
    plain = ImageGroupedBatches(split, tokens, mask, answers, images_per_batch=2, seed=1)
    for a, b in zip(capped.epoch(0), plain.epoch(0), strict=True):
        assert torch.equal(a.question_ids, b.question_ids) and torch.equal(a.images, b.images)
