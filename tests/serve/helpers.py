"""Shared by the server tests: a tiny untrained VQA model and image bytes."""

from __future__ import annotations

import io
import struct
import zlib

import torch
from PIL import Image

from mmfuse.data import AnswerVocab, WordTokenizer
from mmfuse.models.vqa import VQAConfig, VQAModel

__all__ = ["ANSWERS", "png_bytes", "png_header_only", "tiny_model"]

ANSWERS = ["blue", "circle", "no", "red", "square", "yes"]


def tiny_model() -> VQAModel:
    questions = ["what color is the shape?", "what shape is it?", "is there a red shape?"]
    tokenizer = WordTokenizer.fit(questions)
    config = VQAConfig(num_answers=len(ANSWERS), vocab_size=len(tokenizer), cnn_stages=[[8], [16]], dim=32,
                       text_dim=32, num_heads=2, depth=1, image_size=32, fusion="cross_attention")
    torch.manual_seed(0)
    return VQAModel(config, answers=AnswerVocab(ANSWERS), tokenizer=tokenizer).eval()


def png_bytes(color: tuple[int, int, int] = (220, 30, 30), size: int = 40) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (size, size), (255, 255, 255))
    im.paste(color, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels in a few dozen bytes (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
