"""The run directory: what a training run writes, and how it is read back to resume or report.

::

    run.json            the training settings (``TrainConfig``), what ``--resume`` restarts with
    config.json, model.safetensors, ...   the model after the last finished epoch (``save_pretrained``)
    state.safetensors   everything needed to continue: weights, optimizer, scaler, RNG, loop position
    metrics.jsonl       one line per finished epoch

Every file is written atomically (a temporary file, then a rename), so a run killed at any moment
leaves either the previous or the new version of each file, never a torn one. The model files are
written before the state file: a state file always describes weights that exist.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mmfuse.io import CheckpointError, WriteError, atomic_write_text, read_json, write_safetensors

__all__ = [
    "METRICS_NAME",
    "RUN_CONFIG",
    "STATE_NAME",
    "RunDirError",
    "RunLock",
    "append_metrics",
    "check_new_run_dir",
    "data_fingerprint",
    "read_metrics",
    "read_run_config",
    "read_state",
    "remove_temp_files",
    "rng_state",
    "set_rng_state",
    "truncate_metrics",
    "write_run_config",
    "write_state",
]

log = logging.getLogger(__name__)

RUN_CONFIG, STATE_NAME, METRICS_NAME = "run.json", "state.safetensors", "metrics.jsonl"
LOCK_NAME = ".lock"
# Files whose presence means a directory already holds a run (or a saved model) that a new run would replace.
_RUN_FILES = (RUN_CONFIG, STATE_NAME, METRICS_NAME, "model.safetensors", "config.json")


class RunDirError(ValueError):
    """The run directory cannot be used: held by another process, already a finished run, or not a folder."""


class RunLock:
    """An exclusive lock on a run directory for as long as this object lives (``fcntl.flock`` on ``.lock``).

    A second process that tries to take it fails at once with :class:`RunDirError` naming the holder's pid.
    The operating system drops the lock when the holder exits, however it exits (``kill -9`` included), so
    a stale lock file never blocks a resume.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self._fd: int | None = None
        self.path = Path(run_dir) / LOCK_NAME
        _check_folder(Path(run_dir))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunDirError(f"{run_dir}: in use by another mmfuse process (pid {holder}); wait for it to "
                                  "finish, or use another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def _check_folder(run_dir: Path) -> None:
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"{run_dir}: {parent} is a file, not a folder; choose another --out")


def check_new_run_dir(run_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse a directory a new run cannot start in: a file (or under one), or an existing run unless
    ``overwrite``, in which case the old run's files are removed first (so no old row joins the new metrics).
    Call it holding the directory's :class:`RunLock`."""
    run_dir = Path(run_dir)
    _check_folder(run_dir)
    existing = [name for name in _RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise RunDirError(f"{run_dir}: already holds a run ({', '.join(existing)}); continue it with --resume, "
                          "replace it with --overwrite, or choose another --out")
    for name in existing:
        (run_dir / name).unlink()


def data_fingerprint(data: str) -> str:
    """A digest of what a run trains on, to notice a dataset that changed under a resumed run.

    A dataset directory is fingerprinted by its split files' bytes and the names and sizes of the files they
    sit beside (images are not read again); a built-in dataset by its name and package version.
    """
    digest = hashlib.sha256()
    root = Path(data)
    if not root.is_dir():
        from importlib.metadata import PackageNotFoundError, version

        try:
            digest.update(f"{data}:{version(data.replace('-', '_'))}".encode())
        except (PackageNotFoundError, ValueError):
            digest.update(data.encode())
        return digest.hexdigest()[:16]
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            rel = path.relative_to(root).as_posix()
            digest.update(f"{rel}:{path.stat().st_size}\n".encode())
            if path.suffix in (".jsonl", ".parquet", ".csv"):
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def write_run_config(run_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / RUN_CONFIG, json.dumps(settings, indent=2) + "\n")


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings ``run.json`` holds; :class:`CheckpointError` naming the file if missing or invalid."""
    return read_json(Path(run_dir) / RUN_CONFIG)


def write_state(run_dir: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """``state.safetensors``: tensors, and JSON-encoded metadata values (no pickle)."""
    write_safetensors(Path(run_dir) / STATE_NAME, tensors,
                      metadata={k: json.dumps(v) for k, v in metadata.items()})


def read_state(run_dir: str | os.PathLike, required: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of ``state.safetensors``; one-line :class:`CheckpointError` naming the file."""
    path = Path(run_dir) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, nothing to resume")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: json.loads(v) for k, v in raw.items()}
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable training state ({e})") from e
    except Exception as e:  # safetensors' own error types for truncated files
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    missing = [k for k in required if k not in metadata]
    if missing:
        raise CheckpointError(f"{path}: unreadable training state (no {missing})")
    return tensors, metadata


def remove_temp_files(run_dir: str | os.PathLike) -> None:
    """Delete the half-written temporary files a killed write left behind."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def append_metrics(run_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one epoch's row to ``metrics.jsonl`` and fsync it (a torn row is dropped on resume)."""
    path = Path(run_dir) / METRICS_NAME
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        error = WriteError(f"{path}: could not write ({e.strerror or e})")
        error.errno = e.errno
        raise error from e


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (one JSON object per epoch); ``ValueError`` if there are none."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def truncate_metrics(run_dir: str | os.PathLike, epochs_done: int) -> list[dict[str, Any]]:
    """Keep the rows of finished epochs only, and return them.

    A kill may land between a row's append and the checkpoint (a row of an epoch to be trained again), and a
    full disk may tear the last line: such a line is dropped with a warning (resume writes it again).
    """
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    kept: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            epoch = int(row["epoch"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d: not a complete metrics row (a write cut short?); dropped", path, number)
            continue
        if epoch <= epochs_done:
            kept.append(row)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def rng_state() -> dict[str, Tensor]:
    """Every RNG the loop draws from (CPU, and each CUDA device when there is one)."""
    state = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{i}"] = s
    return state


def set_rng_state(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    elif cuda:
        log.warning("the checkpoint holds %d CUDA RNG states, this machine has %d devices: CUDA RNG not restored",
                    len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)
