"""Export a trained VQA model to ONNX, TorchScript or a ``torch.export`` program.

The exported graph is :class:`ExportableVQA`: a plain positional forward over tensors, with dynamic
batch size and question length. Shapes::

    B  questions (one image each)    L  question tokens (1 .. max_length)    S  image side    A  answers

    images: (B, 3, S, S) uint8    ids: (B, L) int64    mask: (B, L) bool, True = real token
    logits: (B, A) float32

Beside the model file, ``FILE.json`` holds what a deployment needs without mmfuse: the word
vocabulary and how to tokenize (lower-case, ``\\w+|[^\\w\\s]`` tokens, ``<cls>`` id first, unknown
words -> ``<unk>``, padding id 0 with mask False), the answer names in logit order, the image size
and the input and output names.

Why a wrapper: ``VQAModel.encode_questions`` encodes each distinct question once through
``torch.unique``, whose output size depends on the data (``torch.export`` cannot trace it), and the
layers take keyword-only arguments and optional tensors, which ``torch.jit.script`` rejects. With one
image per question there is no sharing to exploit, so the wrapper calls the text encoder on every row
and the fusion without ``image_index``: the same logits, and training keeps its fast path. The
TorchScript file is therefore traced (``torch.jit.trace``), not scripted, and checked on a second
batch size and length.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmfuse.data.vocab import CLS, PAD, UNK, WordTokenizer
from mmfuse.io import atomic_write_text
from mmfuse.models.vqa import VQAModel

__all__ = ["FORMATS", "INPUT_NAMES", "OUTPUT_NAMES", "ExportableVQA", "example_inputs", "export", "load_exported"]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "torch-export")
Format = Literal["onnx", "torchscript", "torch-export"]
INPUT_NAMES = ("images", "ids", "mask")
OUTPUT_NAMES = ("logits",)
_MAX_BATCH = 4096  # gather_rows and the attention dispatch branch on sizes above this; exports stay below


class ExportableVQA(nn.Module):
    """``forward(images, ids, mask) -> logits``: :class:`VQAModel` for one image per question,
    positional arguments only and no data-dependent shapes; see the module docstring."""

    def __init__(self, model: VQAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        m = self.model
        image_tokens = m.encode_images(images)  # (B, N, C)
        text_tokens = m.text(ids, mask)  # (B, L, text_dim): every row, no dedup
        out = m.fusion(image_tokens, text_tokens, text_mask=mask)
        return m.head(out.pooled)  # (B, A)


def example_inputs(model: VQAModel, questions: list[str], batch: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Random images and ``questions`` tokenized by the model: ``(images, ids, mask)`` for tracing and tests.

    ``batch`` repeats the questions cyclically to that many rows (default: one row per question).
    """
    batch = batch or len(questions)
    rows = [questions[i % len(questions)] for i in range(batch)]
    ids, mask = model.tokenize(rows)
    S = model.config.image_size
    images = torch.randint(0, 256, (batch, 3, S, S), dtype=torch.uint8)
    return images, ids, mask


def _sidecar(model: VQAModel, fmt: str, path: Path) -> dict[str, Any]:
    tokenizer = getattr(model.text, "tokenizer", None)
    c = model.config
    return {
        "format": fmt,
        "model_file": path.name,
        "inputs": {"images": "(B, 3, S, S) uint8 RGB", "ids": "(B, L) int64", "mask": "(B, L) bool, True = token"},
        "outputs": {"logits": "(B, A) float32, softmax for probabilities"},
        "image_size": c.image_size,
        "max_length": c.max_length,
        "answers": model.answers.names,
        "tokenizer": {
            "type": "word",
            "lowercase": True,
            "pattern": r"\w+|[^\w\s]",
            "cls_id": CLS, "pad_id": PAD, "unk_id": UNK,
            "vocab": tokenizer.to_dict()["vocab"],
        } if isinstance(tokenizer, WordTokenizer) else {"type": "hf", "path": c.hf_path},
    }


def _dims(model: VQAModel) -> dict[str, Any]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=_MAX_BATCH)
    length = Dim("length", min=1, max=model.config.max_length)
    return {"images": {0: batch}, "ids": {0: batch, 1: length}, "mask": {0: batch, 1: length}}


def export(model: VQAModel, out: str | os.PathLike, fmt: Format = "onnx") -> Path:
    """Write ``model`` as ``fmt`` (one of :data:`FORMATS`) to ``out`` and its metadata to ``out.json``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    if model.config.text != "transformer":
        raise ValueError("export supports models with the word-level transformer text encoder (text='transformer')")
    out = Path(out)
    if fmt == "torch-export" and out.suffix != ".pt2":
        raise ValueError(f"{out}: a torch.export program is saved as a .pt2 archive; name the file *.pt2")
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableVQA(model).eval()
    # Two questions of different lengths, so the example has padding and L is not 1.
    inputs = example_inputs(model, ["what shape is it?", "is there a red shape in the image?"], batch=3)
    with torch.no_grad():
        if fmt == "torchscript":
            check = example_inputs(model, ["what color?"], batch=2)
            with warnings.catch_warnings():
                # The shape checks in the layers become constants of the trace: expected, and the trace
                # is checked on another batch size and length right here.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(wrapper, inputs, check_inputs=[check], check_trace=True)
            traced.save(str(out))
        elif fmt == "torch-export":
            program = torch.export.export(wrapper, inputs, dynamic_shapes=_dims(model), strict=False)
            torch.export.save(program, str(out))
        else:
            program = torch.export.export(wrapper, inputs, dynamic_shapes=_dims(model), strict=False)
            onnx_program = torch.onnx.export(program, inputs, input_names=list(INPUT_NAMES),
                                             output_names=list(OUTPUT_NAMES), dynamo=True, verbose=False)
            onnx_program.save(str(out))
    atomic_write_text(Path(f"{out}.json"), json.dumps(_sidecar(model, fmt, out), indent=2) + "\n")
    log.info("exported %s to %s", fmt, out)
    return out


def load_exported(path: str | os.PathLike, fmt: Format) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A callable ``(images, ids, mask) -> logits`` for an exported file (torch formats only;
    ONNX files run with ``onnxruntime.InferenceSession``)."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    if fmt == "torch-export":
        return torch.export.load(str(path)).module()
    raise ValueError(f"load_exported reads 'torchscript' and 'torch-export' files, not {fmt!r}")
