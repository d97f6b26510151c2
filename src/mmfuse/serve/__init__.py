"""``mmfuse serve``: a trained model behind an HTTP API and a page.

``create_app(adapter, config)`` builds the FastAPI application (:mod:`mmfuse.serve.app`);
:mod:`mmfuse.serve.adapter` is the small layer between HTTP and the model, and
:mod:`mmfuse.serve.batching` groups concurrent requests into one forward pass. Needs the ``serve``
extra (``pip install 'mmfuse[serve]'``: FastAPI, uvicorn, python-multipart).
"""

from __future__ import annotations

import logging
import os

import torch

from mmfuse.serve.adapter import Adapter, CaptionAdapter, Request, VQAAdapter
from mmfuse.serve.app import ServeConfig, create_app, decode_image

__all__ = ["Adapter", "CaptionAdapter", "Request", "ServeConfig", "VQAAdapter", "create_app", "decode_image",
           "load_adapter", "run_server"]

log = logging.getLogger(__name__)


def load_adapter(checkpoint: str | os.PathLike, *, device: str = "cpu") -> Adapter:
    """The adapter for the model in ``checkpoint`` (a run directory) on ``device``; loads that directory
    only. ``ValueError`` for a kind of model the server has no adapter for."""
    from mmfuse.device import resolve_device
    from mmfuse.models import PretrainedModel, VQAModel

    model = PretrainedModel.from_pretrained(checkpoint, device=resolve_device(device))
    if isinstance(model, VQAModel):
        return VQAAdapter(model)
    if model.model_type in ("captioner", "answer-generator"):
        return CaptionAdapter(model)
    raise ValueError(f"{checkpoint}: serving supports VQA and caption models, this is a {model.model_type} model")


def run_server(checkpoint: str | os.PathLike, config: ServeConfig | None = None, *, host: str = "127.0.0.1",
               port: int = 8000) -> None:
    """Serve ``checkpoint`` with uvicorn on ``host:port`` until interrupted."""
    import uvicorn

    config = config or ServeConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    app = create_app(load_adapter(checkpoint, device=config.device), config)
    log.info("serving %s on http://%s:%d (page: /, API docs: /docs)", checkpoint, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
