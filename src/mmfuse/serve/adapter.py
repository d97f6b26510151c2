"""The model-facing side of the server: decoded requests in, JSON-ready results out.

The HTTP layer knows only :class:`Adapter`: ``predict`` answers a batch of requests in one forward
pass, ``attention_png`` draws one request's attention. A VQA model returns ``{"answer", "top_k"}``;
another kind of model (a caption decoder, which needs no question) gets its own adapter returning
e.g. ``{"caption"}``, and the HTTP layer, the batching and the page stay as they are.

Shapes::

    S  the model's image side    A  answers

    Request.image: (3, S, S) uint8
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from mmfuse.models.vqa import VQAModel

__all__ = ["Adapter", "CaptionAdapter", "Request", "VQAAdapter"]

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One decoded request: an image resized to the model's side, and the question (may be empty)."""

    image: Tensor  # (3, S, S) uint8
    question: str = ""
    top_k: int = 5


class Adapter(Protocol):
    """What the server needs from a model."""

    kind: str  # "vqa", "caption", ...
    needs_question: bool
    image_size: int

    def info(self) -> dict[str, Any]:
        """Facts for ``/healthz`` and the page (kind, model settings, answer count...)."""
        ...

    def predict(self, requests: list[Request]) -> list[dict[str, Any]]:
        """One JSON-ready result per request, in order; called with up to ``max_batch`` requests."""
        ...

    def attention_png(self, request: Request, *, per_head: bool = False) -> bytes | None:
        """The attention figure of one request as PNG bytes (one panel per word, or per word and head),
        or None when the model has none to show."""
        ...


class VQAAdapter:
    """:class:`Adapter` for :class:`VQAModel`: ``{"answer": str, "top_k": [[answer, probability], ...]}``."""

    kind = "vqa"
    needs_question = True

    def __init__(self, model: VQAModel) -> None:
        self.model = model.eval()
        self.image_size = model.config.image_size
        # Figures are drawn with matplotlib, whose text layout caches are not made for concurrent use.
        self._figure_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        from mmfuse.report import attention_unavailable

        c = self.model.config
        return {"kind": self.kind, "fusion": c.fusion, "vision": c.vision, "image_size": c.image_size,
                "num_answers": c.num_answers, "max_length": c.max_length,
                "attention": attention_unavailable(self.model) is None}

    @torch.no_grad()
    def predict(self, requests: list[Request]) -> list[dict[str, Any]]:
        device = next(self.model.parameters()).device
        images = torch.stack([r.image for r in requests]).to(device)  # (B, 3, S, S)
        ids, mask = (t.to(device) for t in self.model.tokenize([r.question for r in requests]))  # (B, L)
        probs = self.model(images, ids, mask).float().softmax(dim=-1).cpu()  # (B, A)
        names = self.model.answers.names
        k = min(max(r.top_k for r in requests), probs.shape[-1])
        top = probs.topk(k, dim=-1)
        results = []
        for r, values, indices in zip(requests, top.values.tolist(), top.indices.tolist(), strict=True):
            ranked = [[names[i], round(p, 6)] for p, i in zip(values[: r.top_k], indices[: r.top_k], strict=True)]
            results.append({"answer": ranked[0][0], "top_k": ranked})
        return results

    def attention_png(self, request: Request, *, per_head: bool = False) -> bytes | None:
        from mmfuse.plotting import attention_figure, figure_png
        from mmfuse.report import attention_maps, attention_unavailable

        if attention_unavailable(self.model):
            return None
        maps = attention_maps(self.model, request.image, request.question, per_head=per_head)
        columns = 1 + self.model.config.num_heads if per_head else 4  # per head: about one row per word
        with self._figure_lock:
            return figure_png(attention_figure(request.image, maps, max_columns=columns))


class CaptionAdapter:
    """:class:`Adapter` for a text generator: a :class:`~mmfuse.models.Captioner` returns ``{"caption": str}``,
    an :class:`~mmfuse.models.captioner.AnswerGenerator` (which reads the question) ``{"answer": str}``;
    each decoded with the model's own decoding settings."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.image_size = model.config.image_size
        self.needs_question = model.model_type == "answer-generator"
        self.kind = "vqa-generate" if self.needs_question else "caption"
        self._key = "answer" if self.needs_question else "caption"
        self._figure_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        c = self.model.config
        return {"kind": self.kind, "image_size": c.image_size, "attention": True}

    @torch.no_grad()
    def predict(self, requests: list[Request]) -> list[dict[str, Any]]:
        device = next(self.model.parameters()).device
        images = torch.stack([r.image for r in requests]).to(device)  # (B, 3, S, S)
        questions = [r.question for r in requests] if self.needs_question else None
        texts, _ = self.model.generate(images, questions)
        return [{self._key: text} for text in texts]

    def attention_png(self, request: Request, *, per_head: bool = False) -> bytes | None:
        from mmfuse.caption_figures import plot_word_attention

        device = next(self.model.parameters()).device
        questions = [request.question] if self.needs_question else None
        with torch.no_grad():
            _, out = self.model.generate(request.image[None].to(device), questions, need_weights=True)
        # One panel per generated word, heads averaged (the decoder's figure has no per-head form).
        with self._figure_lock, tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "attention.png")
            plot_word_attention(self.model, request.image, out.tokens[0].tolist(), out.attention[0].cpu(), path)
            with open(path, "rb") as f:
                return f.read()
