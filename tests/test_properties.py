"""Property-based tests (hypothesis) of the data layer, the tokenizer and CrossAttention.

- a JSONL split of any mix of valid and invalid lines loads, or fails with a DataError naming the file
  and the first offending line;
- any unicode text encodes: ids in the vocabulary, ``<cls>`` first, masks consistent with the ids;
- images of any size, mode and format decode to uint8 (3, S, S); empty or corrupt files give a
  DataError naming the file, whatever Pillow raises inside;
- CrossAttention on random shapes and masks: finite, rows of weights sum to 1 over kept keys (0 when
  none is kept), and the values at masked positions do not matter;
- masked values never matter, for every attention implementation and every registered fusion: NaN or
  Inf at padded positions give the same outputs and gradients, to the bit, as zeros there, all finite;
  no keys (Nk = 0), empty sequences and a batch of 0 work (empty = every token masked).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import Tensor
from torch.testing import assert_close

from mmfuse import fusion as fusions
from mmfuse.attention import IMPLS, AttentionConfig, attend
from mmfuse.data import DataError, VQASplit, load_image, load_jsonl_split
from mmfuse.encoders.tokenizer import CLS, PAD, UNK, WordTokenizer
from mmfuse.layers import CrossAttention

pytestmark = pytest.mark.usefixtures("single_thread")

FEW = settings(max_examples=40, deadline=None)

# --------------------------------------------------------------------------------------------------
# JSONL splits

GOOD_IMAGES = ["images/a.png", "./images/a.png", "images/b.png", "sub/c.png", "sub/../images/b.png"]
CORRUPT_IMAGES = ["bad.png", "empty.png"]  # decoded only once every line has parsed
BAD_IMAGE_PATHS = ["/etc/hosts", "C:\\x.png", "C:x.png", "../x.png", "images/../../x.png", "images/nope.png",
                   "images", ""]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jsonl")
    files = {"images/a.png": (200, 0, 0), "images/b.png": (0, 200, 0), "sub/c.png": (0, 0, 200)}
    for name, color in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), color).save(root / name)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "empty.png").write_bytes(b"")
    return root


@dataclass
class Line:
    text: str
    kind: str  # "blank", "bad" (rejected when parsed) or "ok"
    image: str | None = None
    question: str | None = None
    answer: str | None = None
    typed: bool = False


def _dump(obj: object, ascii_only: bool) -> str:
    return json.dumps(obj, ensure_ascii=ascii_only)


@st.composite
def good_objects(draw) -> dict:
    obj = {"image": draw(st.sampled_from(GOOD_IMAGES + CORRUPT_IMAGES)),
           "question": draw(st.text(max_size=30)), "answer": draw(st.text(min_size=1, max_size=8))}
    if draw(st.booleans()):
        obj["answer_type"] = draw(st.sampled_from(["color", "shape", ""]))
    if draw(st.booleans()):
        obj["extra"] = draw(st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2)))
    return obj


@st.composite
def lines(draw) -> Line:
    kind = draw(st.sampled_from(["ok", "ok", "ok", "blank", "not json", "not object", "missing key",
                                 "wrong type", "empty answer", "bad image path"]))
    ascii_only = draw(st.booleans())
    if kind == "blank":
        return Line(draw(st.sampled_from(["", " ", "\t", " \t  "])), "blank")
    if kind == "not json":
        text = draw(st.one_of(st.sampled_from(["{", "{'image': 'a'}", '{"image": "a",}', "[1,", "nope"]),
                              st.text(min_size=1, max_size=20)))
        text = text.replace("\n", " ").replace("\r", " ")
        if not text.strip() or text.lstrip().startswith(("{", "\ufeff")):
            text = "{" + text
        return Line(text, "bad")
    if kind == "not object":
        value = draw(st.one_of(st.integers(), st.none(), st.text(max_size=5),
                               st.lists(st.integers(), max_size=3)))
        return Line(_dump(value, ascii_only), "bad")
    obj = draw(good_objects())
    if kind == "missing key":
        del obj[draw(st.sampled_from(["image", "question", "answer"]))]
        return Line(_dump(obj, ascii_only), "bad")
    if kind == "wrong type":
        key = draw(st.sampled_from(["image", "question", "answer", "answer_type"]))
        obj[key] = draw(st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=2)))
        return Line(_dump(obj, ascii_only), "bad")
    if kind == "empty answer":
        obj["answer"] = ""
        return Line(_dump(obj, ascii_only), "bad")
    if kind == "bad image path":
        obj["image"] = draw(st.sampled_from(BAD_IMAGE_PATHS))
        return Line(_dump(obj, ascii_only), "bad")
    return Line(_dump(obj, ascii_only), "ok", obj["image"], obj["question"], obj["answer"],
                "answer_type" in obj)


def _expected_error_line(numbered: list[tuple[int, Line]]) -> int | str | None:
    """The line number the error must name; "file" for an error about the whole file; None: it loads."""
    for n, line in numbered:
        if line.kind == "bad":
            return n
    ok = [(n, line) for n, line in numbered if line.kind == "ok"]
    if not ok:
        return "file"
    typed = [line.typed for _, line in ok]
    if any(typed) and not all(typed):
        return ok[typed.index(False)][0]
    first_use: dict[str, int] = {}
    for n, line in ok:  # images are decoded in the order of their first use
        first_use.setdefault(os.path.normpath(line.image), n)
    return next((n for image, n in first_use.items() if image in CORRUPT_IMAGES), None)


@FEW
@given(st.lists(lines(), max_size=8), st.sampled_from(["\n", "\r\n"]))
def test_jsonl_lines_load_or_fail_naming_file_and_line(dataset_dir, generated, newline):
    path = dataset_dir / "test.jsonl"
    path.write_bytes(newline.join(line.text for line in generated).encode("utf-8"))
    numbered = [(n, line) for n, line in enumerate(generated, start=1) if line.kind != "blank"]
    expected = _expected_error_line(numbered)
    try:
        split = load_jsonl_split(dataset_dir, "test", image_size=4)
    except DataError as e:
        assert expected is not None, f"unexpected DataError: {e}"
        assert str(path) in str(e), str(e)
        if expected != "file":
            assert f"{path} line {expected}:" in str(e), str(e)
        return
    assert expected is None, f"expected a DataError at line {expected}"
    assert isinstance(split, VQASplit)
    ok = [line for _, line in numbered]
    assert split.questions == [line.question for line in ok]
    assert split.answers == [line.answer for line in ok]
    assert (split.answer_types is not None) == ok[0].typed
    for i, line in enumerate(ok):
        assert split.image_paths[int(split.image_index[i])] == str((dataset_dir / line.image).resolve())
    assert len(set(split.image_paths)) == len(split.image_paths), "one file decoded twice"


# --------------------------------------------------------------------------------------------------
# tokenizer


@FEW
@given(st.lists(st.text(max_size=20), max_size=6), st.lists(st.text(max_size=40), max_size=6),
       st.integers(1, 10))
def test_any_unicode_text_encodes_consistently(corpus, texts, max_length):
    tok = WordTokenizer.fit(corpus)
    ids, mask = tok.encode(texts, max_length=max_length)
    N, L = ids.shape
    assert ids.dtype == torch.long and mask.dtype == torch.bool and mask.shape == (N, L) and N == len(texts)
    assert 1 <= L <= max_length
    assert ((ids >= 0) & (ids < len(tok))).all()
    if N:
        assert (ids[:, 0] == CLS).all() and mask[:, 0].all()
    lengths = mask.sum(dim=1)
    assert torch.equal(mask, torch.arange(L)[None, :] < lengths[:, None]), "mask is not a left-aligned prefix"
    assert (ids[~mask] == PAD).all() and (ids[mask] != PAD).all()
    known = set(tok.to_dict()["vocab"])
    for i, text in enumerate(texts):
        words = WordTokenizer.tokenize(text)
        assert int(lengths[i]) == min(1 + len(words), max_length)
        kept = words[: max_length - 1]
        expected = [w if w in known else "<unk>" for w in kept]
        assert tok.decode(ids[i].tolist()) == " ".join(expected)
        assert [int(j) == UNK for j in ids[i, 1:1 + len(kept)]] == [w not in known for w in kept]


def test_empty_and_very_long_questions(caplog):
    tok = WordTokenizer.fit(["what color is the shape"])
    texts = ["", "   ", "what " * 200, "color is " * 40, "shape"]
    with caplog.at_level(logging.WARNING, logger="mmfuse.encoders.tokenizer"):
        ids, mask = tok.encode(texts, max_length=8)
    assert ids.shape == (5, 8)
    assert mask.sum(dim=1).tolist() == [1, 1, 8, 8, 2]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning per call, however many texts are truncated"
    assert "2 of 5" in warnings[0].getMessage() and "max_length=8" in warnings[0].getMessage()
    caplog.clear()
    ids, _ = tok.encode(["what color"], max_length=1)
    assert ids.tolist() == [[CLS]] and len(caplog.records) == 1


# --------------------------------------------------------------------------------------------------
# images


def _expected_color(mode: str, color) -> tuple[float, float, float]:
    if mode == "RGB":
        return color
    if mode == "RGBA":
        *rgb, a = color
        return tuple(c * a / 255 + 255 * (1 - a / 255) for c in rgb)
    if mode == "L":
        return (color,) * 3
    if mode == "I;16":
        return (color * 255 / 65535,) * 3
    return color  # P: the palette colour


def _image(mode: str, size: tuple[int, int], color, noise: np.ndarray | None) -> Image.Image:
    """A uniform image of ``color``, or random pixels from ``noise`` (h, w, 4) uint8."""
    w, h = size
    if mode == "P":  # palette entry 0 black, entry 1 ``color``: uniform images use entry 1 only
        index = np.ones((h, w), np.uint8) if noise is None else noise[..., 0] % 2
        im = Image.frombytes("P", size, index.tobytes())
        im.putpalette([0, 0, 0, *color] + [0] * (3 * 254))
        return im
    if mode == "I;16":
        data = np.full((h, w), color, np.uint16) if noise is None else noise[..., 0].astype(np.uint16) * 257
        return Image.fromarray(data)
    if noise is None:
        return Image.new(mode, size, color)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    return Image.fromarray(np.ascontiguousarray(noise[..., 0] if channels == 1 else noise[..., :channels]))


COLORS = {"RGB": st.tuples(*[st.integers(0, 255)] * 3), "RGBA": st.tuples(*[st.integers(0, 255)] * 4),
          "L": st.integers(0, 255), "P": st.tuples(*[st.integers(0, 255)] * 3), "I;16": st.integers(0, 65535)}
FORMATS = {"RGB": ["png", "bmp", "tiff"], "RGBA": ["png", "tiff"], "L": ["png", "bmp", "gif", "tiff"],
           "P": ["png", "bmp", "gif"], "I;16": ["png", "tiff"]}


@st.composite
def image_files(draw):
    mode = draw(st.sampled_from(list(COLORS)))
    return (mode, draw(st.sampled_from(FORMATS[mode])), (draw(st.integers(1, 24)), draw(st.integers(1, 24))),
            draw(COLORS[mode]), draw(st.booleans()), draw(st.integers(0, 2**16)))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("images")


@FEW
@given(image_files(), st.integers(1, 12))
def test_any_image_decodes_to_uint8_rgb_of_the_asked_size(image_dir, spec, size):
    mode, fmt, wh, color, noisy, seed = spec
    noise = np.random.default_rng(seed).integers(0, 256, (wh[1], wh[0], 4), dtype=np.uint8) if noisy else None
    path = image_dir / f"x.{fmt}"
    _image(mode, wh, color, noise).save(path)
    out = load_image(path, size)
    assert out.dtype == torch.uint8 and out.shape == (3, size, size)
    if not noisy:  # a uniform image stays uniform, in the colour its mode stands for
        expected = torch.tensor(_expected_color(mode, color), dtype=torch.float32)[:, None, None]
        assert (out.float() - expected).abs().max() <= 1.0, (mode, fmt, color, out[:, 0, 0])
    elif mode == "RGB" and wh == (size, size):  # already RGB at the right size: the pixels as they are
        assert torch.equal(out, torch.from_numpy(noise[..., :3].copy()).permute(2, 0, 1))


def _load_or_data_error(path: Path) -> None:
    try:
        out = load_image(path, 8)
    except DataError as e:
        assert str(path) in str(e), str(e)
        return
    assert out.dtype == torch.uint8 and out.shape == (3, 8, 8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@FEW
@given(st.binary(max_size=64), st.sampled_from(["png", "jpg", "gif", "bmp", "tiff", "webp", "bin"]))
def test_random_bytes_decode_or_give_a_data_error(image_dir, data, suffix):
    path = image_dir / f"random.{suffix}"
    path.write_bytes(data)
    _load_or_data_error(path)


@FEW
@given(st.sampled_from([b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"iCCP", b"zTXt", b"iTXt", b"tEXt", b"pHYs",
                        b"gAMA", b"sRGB", b"eXIf", b"acTL", b"fcTL"]),
       st.binary(max_size=40), st.sampled_from([0, 2, 3, 4, 6]), st.sampled_from([1, 2, 4, 8, 16]))
def test_png_with_a_hostile_chunk_decodes_or_gives_a_data_error(image_dir, kind, data, color_type, depth):
    """Well-formed chunk framing (valid CRCs), so the chunk's own parser sees the random payload."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, depth, color_type, 0, 0, 0))
    pixels = _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    body = _png_chunk(kind, data) + pixels + _png_chunk(b"IEND", b"")
    path = image_dir / "hostile.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + body)
    _load_or_data_error(path)


@FEW
@given(st.sampled_from(["png", "gif", "bmp", "tiff", "jpeg", "webp"]), st.floats(0.0, 0.6))
def test_truncated_or_empty_files_give_a_data_error_naming_them(image_dir, fmt, keep):
    whole = image_dir / f"whole.{fmt}"
    Image.new("RGB", (16, 16), (10, 120, 240)).save(whole)
    data = whole.read_bytes()
    cut = image_dir / f"cut.{fmt}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError) as error:
        load_image(cut, 8)
    assert str(cut) in str(error.value)


# --------------------------------------------------------------------------------------------------
# CrossAttention


@st.composite
def attention_cases(draw):
    B, Nq, Nk = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    heads = draw(st.sampled_from([1, 2, 4]))
    masked = draw(st.booleans())
    rows = st.lists(st.booleans(), min_size=Nk, max_size=Nk)
    mask = torch.tensor(draw(st.lists(rows, min_size=B, max_size=B)))  # (B, Nk)
    return {"B": B, "Nq": Nq, "Nk": Nk, "heads": heads, "dim": heads * draw(st.sampled_from([2, 4])),
            "query_dim": draw(st.integers(1, 9)), "context_dim": draw(st.integers(1, 9)),
            "mask": mask if masked else None, "seed": draw(st.integers(0, 2**16))}


@settings(max_examples=60, deadline=None)
@given(attention_cases())
def test_cross_attention_properties(case):
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    B, Nq, Nk, H = case["B"], case["Nq"], case["Nk"], case["heads"]
    layer = CrossAttention(case["query_dim"], case["context_dim"], dim=case["dim"], num_heads=H, impl="math")
    layer.eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5, generator=g)
    x = torch.randn(B, Nq, case["query_dim"], generator=g)
    context = torch.randn(B, Nk, case["context_dim"], generator=g)
    mask = case["mask"]
    with torch.no_grad():
        out, weights = layer(x, context, context_mask=mask, need_weights=True)
    assert out.shape == (B, Nq, case["query_dim"]) and weights.shape == (B, H, Nq, Nk)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()

    keep = torch.ones(B, Nk, dtype=torch.bool) if mask is None else mask
    has_key = keep.any(dim=1)  # (B,)
    assert (weights.masked_select(~keep[:, None, None, :]) == 0).all(), "weight on a masked key"
    assert_close(weights.sum(dim=-1), has_key[:, None, None].float().expand(B, H, Nq), atol=1e-5, rtol=0)
    assert (out[~has_key] == 0).all(), "a sample with no kept key must get zeros"

    # whatever sits at masked positions changes nothing
    junk = torch.randn(B, Nk, case["context_dim"], generator=g) * 1e3
    other = torch.where(keep[..., None], context, junk)
    for impl in ("math", "auto", "chunked"):
        layer.attn.impl = impl
        with torch.no_grad():
            out_a, _ = layer(x, context, context_mask=mask)
            out_b, _ = layer(x, other, context_mask=mask)
        assert_close(out_a, out, atol=1e-5, rtol=1e-5, msg=f"{impl} disagrees with math")
        assert_close(out_b, out_a, atol=1e-5, rtol=1e-5, msg=f"{impl}: masked values leak")


# --------------------------------------------------------------------------------------------------
# masked values never matter: attend (every implementation) and every registered fusion

JUNK = [float("nan"), float("inf"), -float("inf"), "max"]  # "max": the dtype's largest finite value


def _junk(value: float | str, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max if value == "max" else value
# dtypes each implementation runs on CPU (float16 matmuls are slow there but exact enough for this).
DTYPES = {"auto": [torch.float32, torch.float64, torch.bfloat16, torch.float16], "math": [torch.float32,
          torch.float64, torch.bfloat16], "chunked": [torch.float32, torch.float64, torch.bfloat16],
          "local": [torch.float32, torch.float64], "lowrank": [torch.float32, torch.float64]}


def _options(impl: str, Nk: int, draw) -> dict:
    if impl == "local":
        return {"window": draw(st.integers(1, 4)), "num_global": draw(st.integers(0, 2)),
                "block_q": draw(st.integers(1, 3)), "block_k": draw(st.integers(1, 3))}
    if impl == "chunked":
        return {"block_q": draw(st.integers(1, 3)), "block_k": draw(st.integers(1, 3))}
    if impl == "lowrank":
        g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
        rank = draw(st.integers(1, 3))
        return {"proj_k": torch.randn(rank, Nk + 2, generator=g), "proj_v": torch.randn(rank, Nk + 2, generator=g)}
    return {}


@st.composite
def masked_attention_cases(draw):
    impl = draw(st.sampled_from(IMPLS))
    B, H, Nq, Nk = draw(st.integers(0, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(0, 6))
    rows = st.lists(st.booleans(), min_size=Nk, max_size=Nk)
    mask = torch.tensor(draw(st.lists(rows, min_size=B, max_size=B)), dtype=torch.bool).reshape(B, Nk)
    return {"impl": impl, "shape": (B, H, Nq, Nk, draw(st.sampled_from([1, 4]))), "mask": mask,
            "dtype": draw(st.sampled_from(DTYPES[impl])), "junk": draw(st.sampled_from(JUNK)),
            "options": _options(impl, Nk, draw), "seed": draw(st.integers(0, 2**16))}


def _attend_with_grads(case: dict, k: Tensor, v: Tensor, q: Tensor, g: Tensor):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = attend(q, k, v, key_padding_mask=case["mask"], impl=case["impl"], **case["options"])
    grads = torch.autograd.grad(out, (q, k, v), g, allow_unused=True)
    return out, [torch.zeros_like(t) if d is None else d for t, d in zip((q, k, v), grads, strict=True)]


@settings(max_examples=80, deadline=None)
@given(masked_attention_cases())
def test_attend_masked_keys_and_values_never_matter(case):
    B, H, Nq, Nk, D = case["shape"]
    dtype, mask = case["dtype"], case["mask"]
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(dtype) for n in (Nq, Nk, Nk))
    g = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    pad = ~mask[:, None, :, None]
    clean = _attend_with_grads(case, k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0), q, g)
    value = _junk(case["junk"], dtype)
    junk = _attend_with_grads(case, k.masked_fill(pad, value), v.masked_fill(pad, -value), q, g)
    assert clean[0].shape == (B, H, Nq, D) and clean[0].dtype == dtype
    # To the bit: the padded values are selected away before any arithmetic sees them.
    assert torch.equal(junk[0], clean[0])
    for a, b in zip(junk[1], clean[1], strict=True):
        assert torch.equal(a, b)
    assert torch.isfinite(junk[0]).all() and all(torch.isfinite(d).all() for d in junk[1])
    # padded keys and values get exactly no gradient (what attend's pass-through backward relies on)
    assert (junk[1][1].masked_select(pad) == 0).all() and (junk[1][2].masked_select(pad) == 0).all()
    assert (junk[0][~mask.any(dim=1)] == 0).all(), "a sample with no kept key must get zeros"


@pytest.mark.parametrize("impl", IMPLS)
def test_attend_without_keys_or_samples(impl):
    for B, Nk in ((2, 0), (0, 3)):
        options = {"local": {"window": 2, "num_global": 1}, "chunked": {"block_q": 2, "block_k": 2},
                   "lowrank": {"proj_k": torch.randn(2, Nk + 2), "proj_v": torch.randn(2, Nk + 2)}}.get(impl, {})
        q, k, v = torch.randn(B, 2, 3, 4), torch.randn(B, 2, Nk, 4), torch.randn(B, 2, Nk, 4)
        for mask in (None, torch.zeros(B, Nk, dtype=torch.bool)):
            case = {"impl": impl, "mask": mask, "options": options}
            out, grads = _attend_with_grads(case, k, v, q, torch.randn(B, 2, 3, 4))
            assert out.shape == (B, 2, 3, 4) and (out == 0).all() and all(torch.isfinite(d).all() for d in grads)


FUSION_DIMS = {"image_dim": 6, "text_dim": 5, "dim": 8, "num_heads": 2, "depth": 2, "dropout": 0.0}


def _fusion(name: str, impl: str | None = None):
    torch.manual_seed(0)
    configs = {None: "auto", "local": AttentionConfig("local", window=2, num_global=1, block_q=2, block_k=2),
               "lowrank": AttentionConfig("lowrank", rank=2, max_len=16), "chunked": "chunked", "math": "math"}
    fusion = fusions.create(name, **FUSION_DIMS, impl=configs[impl])
    with torch.no_grad():  # open Flamingo's gates, which start closed and would hide the image
        for pname, p in fusion.named_parameters():
            if pname.split(".")[-1].startswith("gate_"):
                p.fill_(0.7)
    return fusion.eval()


def _fuse(fusion, image, text, image_mask, text_mask):
    """pooled, tokens (or None) and the gradients of every parameter and both inputs, as one list."""
    image, text = image.detach().requires_grad_(), text.detach().requires_grad_()
    out = fusion(image, text, image_mask=image_mask, text_mask=text_mask)
    loss = out.pooled.sin().sum() + (0 if out.tokens is None else out.tokens.cos().sum())
    leaves = [image, text, *fusion.parameters()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    return [out.pooled, out.tokens, *(torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads,
                                                                                              strict=True))]


@st.composite
def fusion_inputs(draw):
    # Image token counts that are square grids (1, 4): some fusions place the tokens on a grid.
    B, Ni, Nt = draw(st.integers(0, 3)), draw(st.sampled_from([0, 1, 4])), draw(st.integers(0, 4))

    def mask(n: int) -> Tensor | None:
        if not draw(st.booleans()):
            return None
        return torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=B,
                                          max_size=B)), dtype=torch.bool).reshape(B, n)

    return {"B": B, "Ni": Ni, "Nt": Nt, "image_mask": mask(Ni), "text_mask": mask(Nt),
            "junk": draw(st.sampled_from(JUNK)), "impl": draw(st.sampled_from([None, "chunked", "local", "lowrank"])),
            "seed": draw(st.integers(0, 2**16))}


@pytest.mark.parametrize("name", fusions.available())
@settings(max_examples=12, deadline=None)
@given(case=fusion_inputs())
def test_fusion_padded_tokens_never_matter(name, case):
    fusion = _fusion(name, case["impl"])
    if case["Ni"] == 0 and _refuses_empty_images(fusion):
        return
    gen = torch.Generator().manual_seed(case["seed"])
    B, image_mask, text_mask = case["B"], case["image_mask"], case["text_mask"]
    image = torch.randn(B, case["Ni"], FUSION_DIMS["image_dim"], generator=gen)
    text = torch.randn(B, case["Nt"], FUSION_DIMS["text_dim"], generator=gen)

    def fill(x: Tensor, mask: Tensor | None, value: float) -> Tensor:
        return x if mask is None else x.masked_fill(~mask[..., None], value)

    clean = _fuse(fusion, fill(image, image_mask, 0.0), fill(text, text_mask, 0.0), image_mask, text_mask)
    value = _junk(case["junk"], torch.float32)
    junk = _fuse(fusion, fill(image, image_mask, value), fill(text, text_mask, -value), image_mask, text_mask)
    assert clean[0].shape == (B, fusion.out_dim)
    for a, b in zip(junk, clean, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), name
            assert torch.isfinite(a).all(), name


def _refuses_empty_images(fusion) -> bool:
    """Whether ``fusion`` refuses Ni = 0 with a ValueError about the image tokens (a grid needs a token)."""
    try:
        fusion(torch.randn(2, 0, FUSION_DIMS["image_dim"]), torch.randn(2, 3, FUSION_DIMS["text_dim"]))
    except ValueError as e:
        assert "image" in str(e), str(e)
        return True
    return False


@pytest.mark.parametrize("name", fusions.available())
@pytest.mark.parametrize("empty", ["image", "text"])
def test_fusion_empty_sequence_is_a_fully_masked_one(name, empty):
    """Ni = 0 (or Nt = 0), with or without a mask, gives what fully masked (junk) tokens give, unless the
    fusion refuses empty images with a ValueError naming them (fusions that place image tokens on a grid)."""
    fusion = _fusion(name)
    if empty == "image" and _refuses_empty_images(fusion):
        return
    B, n = 3, {"image": 0, "text": 0}
    image, text = torch.randn(B, 4, FUSION_DIMS["image_dim"]), torch.randn(B, 4, FUSION_DIMS["text_dim"])
    masks = {"image": torch.tensor([[True, True, False, False]] * B), "text": torch.tensor([[True, False, True,
                                                                                            False]] * B)}
    inputs = {"image": image, "text": text}
    full = dict(inputs)
    full[empty] = torch.full((B, 4, inputs[empty].shape[-1]), float("nan"))
    full_masks = dict(masks)
    full_masks[empty] = torch.zeros(B, 4, dtype=torch.bool)
    reference = fusion(full["image"], full["text"], image_mask=full_masks["image"], text_mask=full_masks["text"])
    for empty_mask in (None, torch.zeros(B, n[empty], dtype=torch.bool)):
        short = dict(inputs)
        short[empty] = inputs[empty][:, :0]
        short_masks = dict(masks)
        short_masks[empty] = empty_mask
        out = _fuse(fusion, short["image"], short["text"], short_masks["image"], short_masks["text"])
        assert_close(out[0], reference.pooled, atol=1e-6, rtol=1e-5)
        assert all(t is None or torch.isfinite(t).all() for t in out), name
