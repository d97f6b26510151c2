"""Precomputed image features: one safetensors file per image, a tensor named ``features``.

Shapes::

    M  files (images)      N  tokens per image      D  feature width

    a file's ``features``: (N, D) tokens, or (D,) one vector (read as N = 1)
    load_feature_files(...): (M, N, D), float32 (float16 files stay float16)

Every file of a split must have the same shape, so a batch is one tensor; a file that differs is a
:class:`~mmfuse.data.images.DataError` naming it and the shape expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from .images import DataError

__all__ = ["FEATURES_KEY", "load_feature_file", "load_feature_files"]

FEATURES_KEY = "features"


def load_feature_file(path: str | Path) -> Tensor:
    """The ``features`` tensor of one file as (N, D); errors name the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            if FEATURES_KEY not in f.keys():
                raise DataError(f"{path}: no tensor named {FEATURES_KEY!r} (found {sorted(f.keys())[:5]})", path=path)
            x = f.get_tensor(FEATURES_KEY)
    except (OSError, SafetensorError) as e:
        raise DataError(f"{path}: cannot read image features ({e})", path=path) from e
    if not x.is_floating_point():
        raise DataError(f"{path}: image features must be floating point, got {x.dtype}", path=path)
    if x.dim() == 1:
        x = x[None]  # (1, D)
    elif x.dim() != 2:
        raise DataError(f"{path}: image features must be (N, D) tokens or (D,) a vector, got shape "
                        f"{tuple(x.shape)}", path=path)
    return x


def load_feature_files(paths: Sequence[str | Path], *, desc: str = "features",
                       progress: bool | None = None) -> Tensor:
    """Stack the files' features into (M, N, D); every file must have the first one's shape."""
    if not paths:
        raise ValueError("no feature files")
    first = load_feature_file(paths[0])
    # numpy (the batching's gather) has no bfloat16: such files are widened to float32.
    dtype = torch.float16 if first.dtype == torch.float16 else torch.float32
    out = torch.empty((len(paths), *first.shape), dtype=dtype)
    disable = None if progress is None else not progress
    for i, path in enumerate(tqdm(paths, desc=desc, unit="file", disable=disable, leave=False)):
        x = first if i == 0 else load_feature_file(path)
        if x.shape != first.shape:
            raise DataError(f"{path}: image features of shape {tuple(x.shape)}, expected {tuple(first.shape)} "
                            f"(N tokens x D) like {paths[0]}", path=path)
        out[i] = x
    return out
