"""A frozen Hugging Face causal LM as the caption decoder, with gated cross-attention (Flamingo): identity at
initialisation, frozen LM, cached decoding, save/load."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

from mmfuse.data.captions import CAPTION_COLORS, CAPTION_SHAPES
from mmfuse.generate import generate
from mmfuse.io import CheckpointError
from mmfuse.models import PretrainedModel
from mmfuse.models.captioner import Captioner, CaptionerConfig
from mmfuse.models.gated_lm import LMTokenizer, lm_vocab_size

transformers = pytest.importorskip("transformers", reason="--lm needs transformers (mmfuse[hf])")

from tests.tiny_hf import save_gpt2  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = ["a", "small", "large", *CAPTION_COLORS, *CAPTION_SHAPES, ",", "and", "yes", "no"]
CAPTIONS = ["a small red circle", "a large blue square and a small green triangle", "a large red triangle"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("gpt2"), WORDS)


def lm_captioner(folder, every=1) -> Captioner:
    config = CaptionerConfig(vocab_size=lm_vocab_size(folder), image_size=32, cnn_stages=[[8], [16]], dim=16,
                             num_heads=2, max_length=24, lm=f"hf:{folder}", lm_every=every)
    return Captioner(config, tokenizer=LMTokenizer.load(folder)).eval()


def open_gates(model: Captioner, value: float = 0.7) -> None:
    """Gates as training would leave them: the blocks then change what the LM computes."""
    for block in model.lm.xattn:
        torch.nn.init.constant_(block.gate_cross, value)
        torch.nn.init.constant_(block.gate_ff, value)


def images(n=3):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)


@pytest.mark.parametrize("every,after", [(1, [0, 1]), (2, [1])])
def test_at_initialisation_the_logits_are_the_lms(gpt2, every, after):
    model = lm_captioner(gpt2, every)
    assert model.lm.at == after and len(model.lm.xattn) == len(after)
    ids = model.tokenizer.encode(CAPTIONS, max_length=24)
    assert ids[0, 0] == model.tokenizer.bos_id and model.tokenizer.decode(ids[1, 1:].tolist()) == (
        "a large blue square and a small green triangle")
    context, mask = model.encode(images())
    logits, weights = model.decode(ids, context, mask, need_weights=True)
    plain = transformers.AutoModelForCausalLM.from_pretrained(gpt2, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(logits, plain(input_ids=ids).logits)  # tanh(0) = 0: the blocks add exact zeros
    assert weights.shape == (3, ids.shape[1], 64)  # over the 8x8 image grid
    assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    open_gates(model)
    assert not torch.allclose(model.decode(ids, context, mask)[0], logits)
    assert torch.equal(model.lm.model(input_ids=ids).logits, logits)  # the LM alone is untouched by the hooks


def test_the_lm_is_frozen_and_the_blocks_train(gpt2):
    from mmfuse import tasks

    model = lm_captioner(gpt2).train()
    assert not model.lm.model.training  # frozen: no dropout inside .train()
    assert not any(p.requires_grad for p in model.lm.model.parameters())
    before = copy.deepcopy(model.state_dict())
    lm_before = {k: v.clone() for k, v in model.lm.model.state_dict().items()}
    task = tasks.create("caption")
    split = SimpleNamespace(captions=[[c] for c in CAPTIONS], images=images())
    batch = next(task.batches(model, split, batch_size=3, shuffle=False).epoch(0))
    # scored up to the <eos> after <bos>, though GPT-2's <bos> is that same token
    assert batch.lengths.tolist() == [len(model.tokenizer.hf(c)["input_ids"]) + 2 for c in CAPTIONS]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # step 1 moves the gates (the blocks' own gradients are tanh(0) = 0 then), step 2 the rest
        optimizer.zero_grad()
        task.step(model, batch).loss.backward()
        optimizer.step()
    after = model.state_dict()
    for k, v in model.lm.model.state_dict().items():
        assert torch.equal(v, lm_before[k]), k
    block = "lm.xattn.0."
    for name in ("gate_cross", "gate_ff", "cross_attn.q_proj.weight", "ff.fc1.weight"):
        assert not torch.equal(after[block + name], before[block + name]), name
    assert not torch.equal(after["image_proj.weight"], before["image_proj.weight"])
    assert not any(k.startswith("lm.model.") for k in after)  # the LM's weights are not part of the state


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_decoding_generates_what_the_full_forward_does(gpt2, strategy):
    model = lm_captioner(gpt2)
    open_gates(model)
    context, mask = model.encode(images())
    tok = model.tokenizer
    kwargs = dict(strategy=strategy, num_beams=3, max_new_tokens=10, need_weights=True, eos=None, bos=tok.bos_id,
                  pad=tok.pad_id)
    cached = generate(model, context, mask, use_cache=True, **kwargs)
    full = generate(model, context, mask, use_cache=False, **kwargs)
    assert torch.equal(cached.tokens, full.tokens)
    assert_close(cached.scores, full.scores, rtol=1e-4, atol=1e-4)
    assert_close(cached.attention, full.attention, rtol=1e-4, atol=1e-5)
    ids = tok.encode(CAPTIONS, max_length=24)
    whole, _ = model.decode(ids, context, mask)
    cache = model.new_cache()
    steps = [model.decode(ids[:, t:t + 1], context, mask, cache=cache)[0] for t in range(ids.shape[1])]
    assert_close(torch.cat(steps, dim=1), whole, rtol=1e-4, atol=1e-5)


def test_save_and_load_round_trip(gpt2, tmp_path):
    model = lm_captioner(gpt2)
    open_gates(model, 2.0)
    model.save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["lm"] == str(gpt2) and (tmp_path / "run/lm_tokenizer/tokenizer.json").is_file()
    with safe_open(tmp_path / "run/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm.backbone_fingerprint" in keys and not any(k.startswith("lm.model.") for k in keys)
    loaded = PretrainedModel.from_pretrained(tmp_path / "run")
    assert isinstance(loaded, Captioner) and isinstance(loaded.tokenizer, LMTokenizer)
    x = images(2)
    texts, out = model.generate(x, max_new_tokens=8)
    again, out_again = loaded.generate(x, max_new_tokens=8)
    assert again == texts and torch.equal(out_again.tokens, out.tokens)
    assert_close(loaded.decode(out.tokens, *loaded.encode(x))[0], model.decode(out.tokens, *model.encode(x))[0])
    # a folder holding other weights is refused, not silently decoded with
    other = save_gpt2(tmp_path / "other", WORDS, seed=1)
    config["lm"] = str(other)
    (tmp_path / "run/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="fingerprint"):
        PretrainedModel.from_pretrained(tmp_path / "run")


def test_errors_name_the_setting(gpt2):
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Captioner(CaptionerConfig(vocab_size=lm_vocab_size(gpt2), dim=48, num_heads=3, lm=str(gpt2)),
                  tokenizer=LMTokenizer.load(gpt2))
    with pytest.raises(ValueError, match="exceeds the LM's 64 positions"):
        Captioner(CaptionerConfig(vocab_size=lm_vocab_size(gpt2), dim=16, num_heads=2, max_length=65, lm=str(gpt2)),
                  tokenizer=LMTokenizer.load(gpt2))
    with pytest.raises(ValueError, match="every must be in"):
        lm_captioner(gpt2, every=3)
    with pytest.raises(ValueError, match="LMTokenizer"):
        Captioner(CaptionerConfig(vocab_size=lm_vocab_size(gpt2), dim=16, num_heads=2),
                  tokenizer=LMTokenizer.load(gpt2))
