"""The HTTP API and the page (FastAPI): ``POST /v1/predict``, ``GET /healthz``, ``GET /`` and OpenAPI at ``/docs``.

``POST /v1/predict`` takes either ``multipart/form-data`` (fields ``image`` (a file), ``question``,
optional ``top_k``, ``attention`` and ``per_head``) or JSON ``{"image": BASE64, "question": ..., "top_k": 5,
"attention": false}``, and returns the adapter's result (``{"answer", "top_k"}`` for VQA) plus
``attention_png`` (base64 PNG) when ``attention`` is true and the model has attention to show: one
panel per question word, heads averaged, or one per word and head with ``per_head``.

Bad input never reaches the model and never stops the server: a body over ``max_upload_bytes`` is
refused with 413 (from the ``Content-Length`` header when there is one, before reading the body); an
image over ``max_pixels`` with 400, read from its header before anything is decoded; a file that is
not an image, an empty question, a bad ``top_k`` with 422. Every error is JSON ``{"detail": message}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from starlette.datastructures import UploadFile
from torch import Tensor

# The data layer's RGB conversion (transparency onto white, 16-bit grey...), so served images are read
# exactly as training images were.
from mmfuse.data.images import _DECODE_ERRORS, _to_rgb
from mmfuse.serve.adapter import Adapter
from mmfuse.serve.adapter import Request as ModelRequest
from mmfuse.serve.batching import Batcher

__all__ = ["ServeConfig", "create_app", "decode_image"]

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 1000
MAX_TOP_K = 100
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the text fields, on top of the image itself


@dataclass
class ServeConfig:
    """Server settings: batching and input limits."""

    max_batch: int = 32  # requests answered in one forward pass
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for more
    max_upload_bytes: int = 5_000_000  # largest request body
    max_pixels: int = 16_000_000  # largest width x height, checked from the image header
    threads: int | None = None  # torch intra-op threads; None keeps torch's choice
    device: str = "cpu"  # where the model runs: auto, cpu, cuda[:N], mps

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_upload_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


class BadInput(HTTPException):
    """A client error, returned as ``{"detail": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status_code=status, detail=message)


def decode_image(data: bytes, size: int, *, max_pixels: int) -> Tensor:
    """Image file bytes -> (3, size, size) uint8, as :func:`mmfuse.data.load_image` reads files.

    The pixel count is read from the header before decoding (a 20000 x 20000 PNG is a few KB).
    """
    if not data:
        raise BadInput(422, "image: the file is empty")
    try:
        im = Image.open(io.BytesIO(data))  # parses the header only
    except Image.DecompressionBombError as e:
        raise BadInput(400, f"image: too many pixels ({e})") from e
    except _DECODE_ERRORS as e:
        raise BadInput(422, f"image: not an image file Pillow can read ({type(e).__name__})") from e
    w, h = im.size
    if w * h > max_pixels:
        raise BadInput(400, f"image: {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    try:
        with im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            rgb = _to_rgb(im)
    except _DECODE_ERRORS as e:
        raise BadInput(422, f"image: cannot decode ({type(e).__name__}: {e})") from e
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")
    raise BadInput(422, f"{name}: expected true or false, got {value!r}")


def _top_k(value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadInput(422, f"top_k: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not 1 <= k <= MAX_TOP_K:
        raise BadInput(422, f"top_k: must be between 1 and {MAX_TOP_K}, got {value!r}")
    return k


def _question(value: Any, needed: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise BadInput(422, f"question: expected a string, got {type(value).__name__}")
    question = value.strip()
    if needed and not question:
        raise BadInput(422, "question: empty; ask something about the image")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadInput(422, f"question: {len(question)} characters, more than {MAX_QUESTION_CHARS}")
    return question


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (chunked bodies too)."""
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadInput(413, f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, config: ServeConfig) -> tuple[bytes, dict[str, Any]]:
    """(image bytes, the other fields) from a multipart or JSON request."""
    length = request.headers.get("content-length")
    limit = config.max_upload_bytes + _FORM_OVERHEAD
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadInput(413, f"request body of {length} bytes, over the limit of {config.max_upload_bytes} bytes "
                            "for the image")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            payload = json.loads(await _body(request, limit))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(422, f"body: not valid JSON ({e})") from e
        if not isinstance(payload, dict):
            raise BadInput(422, "body: expected a JSON object with 'image' and 'question'")
        encoded = payload.get("image")
        if not isinstance(encoded, str) or not encoded:
            raise BadInput(422, "image: expected a base64 string (the image file's bytes)")
        if encoded.startswith("data:"):  # a data URL, as a browser's FileReader gives it
            encoded = encoded.partition(",")[2]
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadInput(422, f"image: not valid base64 ({e})") from e
        fields = {k: v for k, v in payload.items() if k != "image"}
    elif kind == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # starlette raises its own MultiPartException / HTTPException for bad forms
            raise BadInput(422, f"body: malformed multipart form ({e})") from e
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise BadInput(422, "image: missing; send the image file as the multipart field 'image'")
        data = await upload.read(config.max_upload_bytes + 1)
        fields = {k: v for k, v in form.items() if k != "image"}
    else:
        raise BadInput(415, f"content type {kind or 'none'!r}: send multipart/form-data or application/json")
    if len(data) > config.max_upload_bytes:
        raise BadInput(413, f"image over the limit of {config.max_upload_bytes} bytes")
    return data, fields


_PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image", "question"],
                "properties": {"image": {"type": "string", "format": "binary"}, "question": {"type": "string"},
                               "top_k": {"type": "integer", "default": 5},
                               "attention": {"type": "boolean", "default": False},
                               "per_head": {"type": "boolean", "default": False}}}},
            "application/json": {"schema": {
                "type": "object", "required": ["image", "question"],
                "properties": {"image": {"type": "string", "description": "the image file, base64"},
                               "question": {"type": "string"}, "top_k": {"type": "integer", "default": 5},
                               "attention": {"type": "boolean", "default": False},
                               "per_head": {"type": "boolean", "default": False}}}},
        },
    },
    "responses": {
        "200": {"description": '{"answer": str, "top_k": [[answer, probability], ...]} (+ "attention_png")'},
        "400": {"description": "image over max_pixels"}, "413": {"description": "body over max_upload_bytes"},
        "415": {"description": "neither multipart nor JSON"},
        "422": {"description": "not an image, empty question, bad field"},
    },
}


def _examples() -> list[dict[str, str]]:
    listing = json.loads(resources.files("mmfuse.serve").joinpath("examples/examples.json").read_text("utf-8"))
    return [{"url": f"/examples/{e['image']}", "question": e["question"]} for e in listing["examples"]]


def create_app(adapter: Adapter, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``adapter``; see the module docstring."""
    config = config or ServeConfig()
    batcher: Batcher[ModelRequest, dict[str, Any]] = Batcher(adapter.predict, max_batch=config.max_batch,
                                                             max_wait_ms=config.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="mmfuse", version="1", lifespan=lifespan,
                  description=f"Answers questions about images with a trained mmfuse {adapter.kind} model.")
    app.state.batcher = batcher
    app.state.config = config
    static = resources.files("mmfuse.serve")
    app.mount("/static", StaticFiles(directory=str(static.joinpath("static"))), name="static")
    app.mount("/examples", StaticFiles(directory=str(static.joinpath("examples"))), name="examples")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(static.joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness, and what is being served."""
        return {"status": "ok", **adapter.info(), "needs_question": adapter.needs_question,
                "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                "max_upload_bytes": config.max_upload_bytes, "max_pixels": config.max_pixels}

    @app.get("/v1/examples")
    async def examples() -> list[dict[str, str]]:
        """Bundled example images (easy-VQA test images) and a question for each."""
        return _examples()

    @app.post("/v1/predict", openapi_extra=_PREDICT_DOC)
    async def predict(request: Request) -> dict[str, Any]:
        """Answer a question about an image (multipart or JSON; see the request body schemas)."""
        data, fields = await _parse(request, config)
        unknown = sorted(set(fields) - {"question", "top_k", "attention", "per_head"})
        if unknown:
            raise BadInput(422, f"unknown field(s) {unknown}; expected image, question, top_k, attention, per_head")
        question = _question(fields.get("question"), adapter.needs_question)
        top_k = _top_k(fields.get("top_k", 5))
        want_attention = _flag(fields.get("attention", False), "attention")
        per_head = _flag(fields.get("per_head", False), "per_head")
        image = decode_image(data, adapter.image_size, max_pixels=config.max_pixels)
        item = ModelRequest(image=image, question=question, top_k=top_k)
        result = dict(await batcher.submit(item))
        if want_attention:
            draw = functools.partial(adapter.attention_png, item, per_head=per_head)
            png = await asyncio.get_running_loop().run_in_executor(batcher.executor, draw)
            if png is None:
                result["attention_error"] = "this model has no attention map to show"
            else:
                result["attention_png"] = base64.b64encode(png).decode("ascii")
        return result

    return app
