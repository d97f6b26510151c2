"""VQAModel with every attention implementation: one AttentionConfig reaches every layer, and trains.

Every fusion x ``local`` / ``lowrank`` / ``chunked`` takes a couple of optimiser steps on the tiny
JSONL dataset, the way ``mmfuse train --impl ...`` builds it.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from mmfuse.attention import Attention, AttentionConfig
from mmfuse.data import AnswerVocab, WordTokenizer, load_split
from mmfuse.fusion import available, get
from mmfuse.models import VQAConfig, VQAModel
from tests.tiny_data import make_tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

# Two CNN stages on 32x32 images: an 8x8 grid, 64 image tokens; questions are at most 6 tokens.
SMALL = {"cnn_stages": [[8], [16]], "dim": 16, "text_dim": 16, "num_heads": 2, "text_heads": 2, "image_size": 32,
         "max_length": 8, "depth": 1}
IMAGE_TOKENS = 64
IMPLS = {"local": {"window": 16}, "lowrank": {"rank": 8}, "chunked": {}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_images=12, size=32)
    split = load_split(str(root), "train", image_size=32).first_images(4)
    return split, WordTokenizer.fit(split.questions), AnswerVocab(split.answers)


def make(tiny, fusion: str, impl: str, **options) -> VQAModel:
    _, tokenizer, answers = tiny
    config = VQAConfig(num_answers=len(answers), vocab_size=len(tokenizer), fusion=fusion, impl=impl,
                       **{**SMALL, **IMPLS[impl], **options})
    return VQAModel(config, answers=answers, tokenizer=tokenizer)


def attentions(model: VQAModel) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("fusion", available())
def test_every_fusion_builds_and_trains_with_the_impl(tiny, fusion, impl):
    torch.manual_seed(0)
    split, _, answers = tiny
    model = make(tiny, fusion, impl).train()
    assert attentions(model) and all(a.config.impl == impl for a in attentions(model))
    ids, mask = model.tokenize(split.questions)
    targets = torch.tensor([answers.index(a) for a in split.answers])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(split.images, ids, mask, split.image_index), targets)
        optimizer.zero_grad()
        loss.backward()
        # Gradients flow through the layers that run the impl; checked at the second step, since a fusion
        # may start unconditioned (film's scale and shift are zero at init, so the text gets none at first).
        if len(losses) == 1:
            layers = [] if fusion == "image_only" else [model.text]  # image_only ignores the question
            # multi_hop computes its one-query-per-hop softmax itself (it reads the logits too): no impl
            if model.fusion.attention_layout is not None and "impl" in inspect.signature(get(fusion)).parameters:
                layers.append(model.fusion)
            for layer in layers:
                grads = [p.grad for n, p in layer.named_parameters() if ".q_proj." in n and p.grad is not None]
                assert grads and any(g.abs().sum() > 0 for g in grads), type(layer).__name__
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] != losses[0]


@pytest.mark.parametrize(
    ("fusion", "key_lengths"),
    [
        ("cross_attention", {IMAGE_TOKENS}),
        ("attention_pooling", {IMAGE_TOKENS + SMALL["max_length"]}),
        ("self_attention", {IMAGE_TOKENS + SMALL["max_length"]}),
        ("gated_cross_attention", {SMALL["max_length"], IMAGE_TOKENS}),
        ("fusion_transformer", {SMALL["max_length"], IMAGE_TOKENS}),
    ],
)
def test_lowrank_projections_cover_the_sequences_each_layer_attends_over(tiny, fusion, key_lengths):
    model = make(tiny, fusion, "lowrank")
    assert {a.proj_k.shape for a in attentions(model.text)} == {(8, SMALL["max_length"])}
    assert {a.proj_k.shape[1] for a in attentions(model.fusion)} == key_lengths
    pooled = make(tiny, "cross_attention", "lowrank", pool_queries=5)
    assert {a.proj_k.shape[1] for a in attentions(pooled.pool)} == {IMAGE_TOKENS}
    assert {a.proj_k.shape[1] for a in attentions(pooled.fusion)} == {5}  # the fusion sees 5 latents


def test_attention_options_are_saved_and_old_configs_still_load(tiny, tmp_path):
    model = make(tiny, "fusion_transformer", "local", num_global=2, block_q=4)
    assert model.config.attention == AttentionConfig("local", window=16, num_global=2, block_q=4)
    model.save_pretrained(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["impl"], saved["window"], saved["num_global"], saved["block_q"]) == ("local", 16, 2, 4)
    again = VQAModel.from_pretrained(tmp_path / "run")
    assert again.config == model.config
    images, ids, mask = tiny[0].images[:1], *model.tokenize(["what shape is it?"])
    torch.testing.assert_close(again(images, ids, mask), model.eval()(images, ids, mask))

    for name in ("window", "num_global", "block_q", "block_k", "rank"):  # a config.json from before them
        del saved[name]
    saved["impl"] = "auto"
    assert VQAConfig.from_dict(saved).attention == AttentionConfig("auto")


@pytest.mark.parametrize(("options", "match"), [
    ({"impl": "local"}, "needs window="),
    ({"impl": "lowrank"}, "needs rank="),
    ({"impl": "auto", "window": 16}, r"window= applies to impl in \['local'\], not impl='auto'"),
    ({"impl": "chunked", "rank": 4}, "rank= applies to impl in"),
])
def test_config_rejects_options_the_impl_does_not_take(tiny, options, match):
    _, tokenizer, answers = tiny
    with pytest.raises(ValueError, match=match):
        VQAConfig(num_answers=len(answers), vocab_size=len(tokenizer), **options)
