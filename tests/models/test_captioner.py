"""The caption decoder: causality, cached decoding against a full forward, decoding strategies, save/load."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mmfuse.data.vocab import WordTokenizer
from mmfuse.generate import _filter_logits, generate
from mmfuse.models import PretrainedModel
from mmfuse.models.captioner import BOS, EOS, PAD, AnswerGenerator, Captioner, CaptionerConfig, CaptionTokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTIONS = ["a small red circle and a large blue square", "a large green triangle, a small red square and a "
            "small blue circle"]


def tiny_model(question: bool = False, **config) -> Captioner:
    tok = CaptionTokenizer.fit(CAPTIONS)
    q_tok = WordTokenizer.fit(["what colour is it?", "what shape?"]) if question else None
    cfg = CaptionerConfig(vocab_size=len(tok), image_size=32, cnn_stages=[[8], [16]], dim=32, num_heads=4,
                          max_length=40, question_vocab_size=len(q_tok) if q_tok else 0, **config)
    cls = AnswerGenerator if question else Captioner
    return cls(cfg, tokenizer=tok, question_tokenizer=q_tok).eval()


def images(n=3):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)


def test_tokenizer_round_trip():
    tok = CaptionTokenizer.fit(CAPTIONS)
    ids = tok.encode(CAPTIONS, max_length=40)
    assert ids[0, 0] == BOS and (ids == EOS).sum() == 2 and ids[0, -1] == PAD
    assert [tok.decode(row[1:].tolist()) for row in ids] == CAPTIONS
    assert tok.decode([tok.vocab.index("a"), EOS, tok.vocab.index("red")]) == "a"  # stops at <eos>
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(CAPTIONS, max_length=5)


def test_logits_do_not_see_future_tokens():
    model = tiny_model()
    ids = CaptionTokenizer.fit(CAPTIONS).encode(CAPTIONS[:1], max_length=40).repeat(3, 1)
    other = ids.clone()
    other[:, 6:] = 5
    x = images()
    assert_close(model(x, ids)[:, :6], model(x, other)[:, :6])


def test_tied_embeddings():
    model = tiny_model()
    assert model.embed.weight.data_ptr() in {p.data_ptr() for p in model.parameters()}
    assert sum(p.shape == model.embed.weight.shape for p in model.parameters()) == 1


@pytest.mark.parametrize("question", [False, True])
def test_cached_decoding_gives_the_full_forward_logits(question):
    model = tiny_model(question)
    qs = ["what colour is it?", "what shape?", "what?"] if question else None
    q = model.tokenize_questions(qs) if question else (None, None)
    context, mask = model.encode(images(), *q)
    ids = torch.randint(4, model.config.vocab_size, (3, 9))
    ids[:, 0] = BOS
    full, _ = model.decode(ids, context, mask)
    cache = model.new_cache()
    steps = [model.decode(ids[:, t:t + 1], context, mask, cache=cache)[0] for t in range(ids.shape[1])]
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert len(cache) == 9


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_cache_does_not_change_what_is_generated(strategy):
    model = tiny_model()
    context, mask = model.encode(images())
    kwargs = dict(strategy=strategy, max_new_tokens=8, num_beams=3, top_k=5, top_p=0.9, need_weights=True, eos=None)
    a = generate(model, context, mask, use_cache=True, generator=torch.Generator().manual_seed(3), **kwargs)
    b = generate(model, context, mask, use_cache=False, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.tokens, b.tokens)
    assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    assert a.attention.shape == (3, 8, 64)  # 8 tokens over the 8x8 grid of a 32-pixel image after 2 stages
    assert_close(a.attention.sum(-1), torch.ones(a.attention.shape[:2]))


def test_greedy_is_beam_of_one_and_beam_scores_no_worse():
    model = tiny_model()
    context, mask = model.encode(images())
    greedy = generate(model, context, mask, max_new_tokens=8)
    beam1 = generate(model, context, mask, strategy="beam", num_beams=1, max_new_tokens=8, length_penalty=0.0)
    assert torch.equal(greedy.tokens, beam1.tokens)
    assert_close(greedy.scores, beam1.scores, rtol=1e-4, atol=1e-4)
    beam4 = generate(model, context, mask, strategy="beam", num_beams=4, max_new_tokens=8, length_penalty=0.0)
    assert (beam4.scores >= greedy.scores - 1e-4).all()  # the greedy path is among those beam search weighs


class ScriptedDecoder:
    """Emits ``script[row][step]`` with certainty; counts the tokens it is fed."""

    def __init__(self, script, vocab=8):
        self.script, self.vocab, self.fed = torch.tensor(script), vocab, 0

    def new_cache(self):
        return None

    def decode(self, ids, context, context_mask=None, *, cache=None, need_weights=False):
        self.fed += ids.numel()
        logits = torch.full((ids.shape[0], ids.shape[1], self.vocab), -10.0)
        n, step = ids.shape[0], ids.shape[1] - 1
        rows = torch.arange(n) * len(self.script) // n  # beam search repeats each row num_beams times
        logits[torch.arange(n), -1, self.script[rows, step]] = 10.0
        return logits, None


def test_eos_stops_each_row_and_pads_after_it():
    script = [[5, EOS, 6, 6], [5, 6, 7, EOS]]
    out = generate(ScriptedDecoder(script), torch.zeros(2, 1, 4), max_new_tokens=4, use_cache=False)
    assert out.tokens.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, EOS]]
    short = generate(ScriptedDecoder(script), torch.zeros(2, 1, 4), max_new_tokens=2, use_cache=False)
    assert short.tokens.tolist() == [[5, EOS], [5, 6]]
    beam = generate(ScriptedDecoder(script), torch.zeros(2, 1, 4), strategy="beam", num_beams=2, max_new_tokens=4,
                    use_cache=False)
    assert beam.tokens.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, EOS]]


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(_filter_logits(logits, 2, 1.0)[0, 2:]).all()
    assert not torch.isinf(_filter_logits(logits, 2, 1.0)[0, :2]).any()
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = ~torch.isinf(_filter_logits(logits, 0, 0.8)[0])
    assert kept.tolist() == [True, True, False, False] and probs[:2].sum() >= 0.8
    samples = {int(generate_one(logits)) for _ in range(30)}
    assert samples <= {0, 1}


def generate_one(logits):
    return torch.multinomial(_filter_logits(logits, 2, 1.0).softmax(-1), 1)[0, 0]


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(question=True)
    model.save_pretrained(tmp_path)
    loaded = PretrainedModel.from_pretrained(tmp_path)
    assert isinstance(loaded, AnswerGenerator) and loaded.tokenizer.vocab == model.tokenizer.vocab
    x = images(2)
    qs = ["what shape?", "what colour is it?"]
    assert loaded.generate(x, qs)[0] == model.generate(x, qs)[0]
    with pytest.raises(ValueError, match="question"):
        model.encode(x)


def test_config_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        CaptionerConfig(vocab_size=2)
    with pytest.raises(ValueError, match="divisible"):
        CaptionerConfig(vocab_size=10, dim=30, num_heads=4)


def test_decode_checks_the_context_once_at_its_entry():
    model = tiny_model()
    ids = torch.full((2, 1), BOS)
    with pytest.raises(ValueError, match=r"context must have shape \(2, N, 32\), got \(2, 5, 31\)"):
        model.decode(ids, torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="context_mask"):
        model.decode(ids, torch.randn(2, 5, 32), torch.ones(2, 4, dtype=torch.bool))
    assert not any(block.validate_inputs for block in model.blocks)  # the blocks trust what decode checked
