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

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mmfuse.io import CheckpointError, atomic_write_text, read_json, write_safetensors

__all__ = [
    "METRICS_NAME",
    "RUN_CONFIG",
    "STATE_NAME",
    "append_metrics",
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
    """Append one epoch's row to ``metrics.jsonl`` and fsync it."""
    with open(Path(run_dir) / METRICS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (one JSON object per epoch); ``ValueError`` if there are none."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def truncate_metrics(run_dir: str | os.PathLike, epochs_done: int) -> None:
    """Keep the rows of finished epochs only (a kill may land between the row's append and the checkpoint)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done]
    atomic_write_text(path, "".join(r + "\n" for r in rows))


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
