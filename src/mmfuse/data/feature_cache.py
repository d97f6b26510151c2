"""The frozen-feature cache: a frozen vision backbone's tokens, computed once per image and kept on disk.

A frozen backbone maps an image to the same tokens every epoch; computing them once turns every later
epoch (and every later run on the same images) into training the fusion and head alone. The tokens of a
split are one ``.npy`` file, float32 (the same numbers the backbone gives, so a model answers alike with
and without the cache), memory-mapped when reused::

    <cache_dir>/features/<backbone identity>-<images digest>.npy     (M, N, D) float32

The key is everything the tokens depend on: the backbone's weight fingerprint, its preprocessing
settings (:meth:`~mmfuse.encoders.hf_vision.HFVisionEncoder.identity`) and the SHA-256 of the split's
decoded images. ``cache_dir`` defaults to ``$MMFUSE_CACHE`` (else ``~/.cache/mmfuse``); set
``MMFUSE_FEATURE_CACHE=0`` to compute tokens in memory instead of on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .disk import content_digest, read_array, write_array
from .easy_vqa import default_cache_dir
from .split import VQASplit

__all__ = ["cached_image_tokens", "feature_cache_enabled"]

logger = logging.getLogger(__name__)


def feature_cache_enabled() -> bool:
    return os.environ.get("MMFUSE_FEATURE_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


@torch.no_grad()
def _encode(encoder: nn.Module, images: Tensor, out: Any, *, device: torch.device, batch_size: int,
            progress: bool | None, desc: str) -> None:
    disable = None if progress is None else not progress
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", disable=disable, leave=False):
        tokens = encoder(images[start : start + batch_size].to(device)).float().cpu()  # (b, N, D)
        out[start : start + tokens.shape[0]] = tokens


def cached_image_tokens(encoder: nn.Module, split: VQASplit, *, device: torch.device | str = "cpu",
                        cache_dir: str | Path | None = None, batch_size: int = 32,
                        progress: bool | None = None) -> VQASplit:
    """``split`` with its images replaced by ``encoder``'s tokens (M, N, D), from the cache or computed into it.

    ``encoder`` is a frozen backbone with ``identity()`` (e.g. a frozen
    :class:`~mmfuse.encoders.hf_vision.HFVisionEncoder`), taking uint8 images (B, 3, S, S).
    """
    if split.has_features:
        return split
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    try:
        M = split.images.shape[0]
        desc = f"features {split.name}"
        key = f"{encoder.identity()}-{content_digest(split.images)[:32]}" if feature_cache_enabled() else None
        path = Path(cache_dir or default_cache_dir()) / "features" / f"{key}.npy"
        cached = read_array(path, (M, None, None), np.float32) if key else None
        if cached is not None:
            logger.info("feature cache: reused %d images from %s", M, path)
            return dataclasses.replace(split, images=cached)
        with torch.no_grad():
            probe = encoder(split.images[:1].to(device))  # (1, N, D): the shape of the file
        shape = (M, *probe.shape[1:])
        if key is None:
            tokens = torch.empty(shape, dtype=torch.float32)
            _encode(encoder, split.images, tokens, device=device, batch_size=batch_size, progress=progress,
                    desc=desc)
            return dataclasses.replace(split, images=tokens)
        try:
            tokens = write_array(path, shape, np.float32, lambda out: _encode(
                encoder, split.images, out, device=device, batch_size=batch_size, progress=progress, desc=desc))
        except OSError as e:
            logger.warning("cannot write the feature cache %s (%s); computing the tokens in memory", path, e)
            tokens = torch.empty(shape, dtype=torch.float32)
            _encode(encoder, split.images, tokens, device=device, batch_size=batch_size, progress=progress,
                    desc=desc)
        else:
            logger.info("feature cache: wrote %d images to %s", M, path)
        return dataclasses.replace(split, images=tokens)
    finally:
        encoder.train(was_training)
