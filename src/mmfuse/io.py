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

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "WriteError",
    "atomic_path",
    "atomic_write_text",
    "check_bounds",
    "dataclass_from_dict",
    "load_checked",
    "load_weights",
    "read_json",
    "write_safetensors",
]


T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, tampered with or does not fit the model."""


class WriteError(OSError):
    """A file could not be written (full disk, no permission...); the message names it. The previous
    version of the file, if any, is untouched."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: mkstemp's 0600 made run files private


def _write_error(path: Path, e: BaseException) -> WriteError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    error = WriteError(f"{path}: could not write ({reason})")
    error.errno = getattr(e, "errno", None)
    return error


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside ``path``; once the block succeeds it is fsynced and replaces ``path``.

    Readers see the old file or the complete new one, never a partial one (``os.replace`` is atomic);
    on error the temporary file is removed, and an error of the file system (a full disk) becomes a
    :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(path, e) from e
        except Exception as e:  # safetensors reports a failed write with its own error type
            if "os error" in str(e).lower() or "no space" in str(e).lower():
                raise _write_error(path, e) from e
            raise
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


def check_bounds(obj: Any, bounds: dict[str, tuple[float, float]]) -> None:
    """``ValueError`` naming the field unless each ``obj.<field>`` is a number in ``[low, high]``; an int field
    (its default is an int) must hold an int. Bounds keep a typo (``dim: 20000``) from allocating for minutes
    before failing."""
    for name, (low, high) in bounds.items():
        value = getattr(obj, name)
        integral = isinstance(obj.__dataclass_fields__[name].default, int) if hasattr(obj, "__dataclass_fields__") \
            else isinstance(value, int)
        ok_type = isinstance(value, int) if integral else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise ValueError(f"{name} must be {'an int' if integral else 'a number'}, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`CheckpointError` naming the file if missing or invalid."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, bad UTF-8, an int of 5,000 digits
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    except RecursionError as e:
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply)") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load a safetensors state dict into ``model``, with one-line errors that name the file; returns the
    file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    load_checked(model, state, path)
    return metadata


def load_checked(model: nn.Module, state: dict[str, Tensor], path: str | os.PathLike) -> None:
    """``model.load_state_dict(state)`` after checking names and shapes; errors name ``path``.

    A module with an ``upgrade_state(state, prefix)`` method first brings its part of an older checkpoint's
    state (its keys start with ``prefix``) to the current layout, e.g. a frozen backbone's weights, which
    older versions saved (:func:`mmfuse.encoders.hf.freeze_backbone`)."""
    state = dict(state)
    for name, module in model.named_modules():
        upgrade = getattr(module, "upgrade_state", None)
        if callable(upgrade):
            try:
                upgrade(state, f"{name}." if name else "")
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from e
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
        if tensor.dtype != own[name].dtype:
            raise CheckpointError(f"{path}: {name} is {tensor.dtype}, the model holds {own[name].dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name} holds NaN or infinite values")
    model.load_state_dict(state)

