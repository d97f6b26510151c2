"""Files that must survive a crash: atomic writes, and JSON / safetensors only (nothing is unpickled)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CheckpointError", "atomic_path", "atomic_write_text", "dataclass_from_dict", "load_checked", "load_weights",
    "read_json", "write_safetensors",
]


T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, tampered with or does not fit the model."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside ``path``; once the block succeeds it is fsynced and replaces ``path``.

    Readers see the old file or the complete new one, never a partial one (``os.replace`` is atomic);
    on error the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors(path: str | os.PathLike, state: dict[str, Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Save tensors atomically (made contiguous; tensors sharing storage are cloned apart)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def dataclass_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """``cls(**d)``, refusing keys that are not fields of ``cls`` with a ``ValueError`` naming them."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} {unknown}")
    return cls(**d)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`CheckpointError` naming the file if missing or invalid."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state dict into ``model``, with one-line errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    load_checked(model, state, path)


def load_checked(model: nn.Module, state: dict[str, Tensor], path: str | os.PathLike) -> None:
    """``model.load_state_dict(state)`` after checking names and shapes; errors name ``path``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config needs "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict(state)

