"""What every mmfuse model shares: ``save_pretrained`` / ``from_pretrained`` and the ``model_type`` registry.

A saved model is a directory::

    config.json         {"model_type": ..., <the config dataclass's fields>}
    model.safetensors   the weights (never pickle)
    ...                 whatever the model adds (VQA: vocab.json, the tokenizer and answer names)

``PretrainedModel.from_pretrained(dir)`` reads ``model_type`` and rebuilds the right class, so code
that serves any task (evaluate, predict, serve) loads a run directory without knowing what it holds;
``VQAModel.from_pretrained(dir)`` also checks that the directory holds a VQA model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmfuse.io import CheckpointError, atomic_write_text, load_weights, read_json, write_safetensors

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PretrainedModel", "available_memory", "check_fits_in_memory",
           "model_types"]

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

_MODEL_TYPES: dict[str, type[PretrainedModel]] = {}

log = logging.getLogger(__name__)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_fits_in_memory(build: Callable[[], nn.Module], *, copies: int = 1, what: str = "this model") -> None:
    """Raise ``ValueError`` with the estimate if ``copies`` fp32 copies of the parameters ``build()`` makes
    cannot fit in the available memory. The model is built on the meta device: nothing is allocated."""
    try:
        with torch.device("meta"):
            model = build()
    except (TypeError, ValueError):
        raise
    except Exception as e:
        log.debug("memory estimate skipped: %s", e)
        return
    params = sum(p.numel() for p in model.parameters())
    need, free = 4 * params * copies, available_memory()
    if free is not None and need > free:
        raise ValueError(f"{what} needs about {need / 2**30:.1f} GiB ({params / 1e6:,.0f}M parameters x {copies} "
                         f"fp32 copies) but only {free / 2**30:.1f} GiB of memory is available; reduce the sizes")


def model_types() -> list[str]:
    """The ``model_type`` names a run directory may hold."""
    return sorted(_MODEL_TYPES)


class PretrainedModel(nn.Module):
    """Base of the mmfuse models. A subclass sets ``model_type`` and ``config_class`` (a dataclass with
    ``to_dict`` / ``from_dict``), keeps its config in ``self.config``, and overrides
    :meth:`save_extra` / :meth:`from_config` when it stores more than weights and config."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_type" in cls.__dict__:
            _MODEL_TYPES[cls.model_type] = cls

    # ----------------------------------------------------------------------------------------------
    def save_extra(self, directory: Path) -> None:
        """Write files besides the config and the weights (called before the config is written)."""

    def checkpoint_metadata(self) -> dict[str, str]:
        """Strings stored in the weights file's metadata, checked again by :meth:`verify_metadata` on load
        (e.g. a digest of the files :meth:`save_extra` writes, so an edited vocabulary cannot pass)."""
        return {}

    def verify_metadata(self, metadata: dict[str, str], directory: Path) -> None:
        """Raise :class:`CheckpointError` where the loaded model disagrees with what it was saved with."""
        for key, expected in self.checkpoint_metadata().items():
            if key in metadata and metadata[key] != expected:
                raise CheckpointError(f"{directory}: the files beside {WEIGHTS_NAME} were changed after it was "
                                      f"saved ({key} differs: edited or reordered?)")

    @classmethod
    def from_config(cls, config: Any, directory: Path | None = None) -> PretrainedModel:
        """A freshly initialised model for ``config``; ``directory`` holds the files of :meth:`save_extra`."""
        return cls(config)

    # ----------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model's files into ``directory``, each atomically; ``config.json`` last, so a directory
        with a config always has the files it describes."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(directory / WEIGHTS_NAME, self.state_dict(),
                          metadata={"model_type": self.model_type, **self.checkpoint_metadata()})
        self.save_extra(directory)
        config = {"model_type": self.model_type, **self.config.to_dict()}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu",
                        map_location: str | torch.device | None = None) -> Any:
        """Rebuild a saved model on ``device`` in eval mode (JSON and safetensors only; nothing is unpickled).

        Called on :class:`PretrainedModel` itself it returns whatever model the directory holds.
        ``map_location`` is an alias of ``device``.
        """
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        raw = read_json(config_path)
        model_type = raw.pop("model_type", None)
        own = cls.__dict__.get("model_type") if cls is not PretrainedModel else None
        target = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        if own is not None and model_type is None:
            target = cls  # config.json written before model_type was recorded
        if target is None or (own is not None and target is not cls):
            expected = own or f"one of {model_types()}"
            raise CheckpointError(f"{config_path}: does not describe a {expected} model (model_type {model_type!r})")
        try:
            config = target.config_class.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{config_path}: invalid model config: {e}") from e
        try:
            check_fits_in_memory(lambda: target.from_config(config, directory), what=f"the model in {config_path}")
            model = target.from_config(config, directory)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as e:  # a value of the wrong type, or extra files that do not fit
            raise CheckpointError(f"{config_path} and the files beside it do not describe one model: {e}") from e
        metadata = load_weights(model, directory / WEIGHTS_NAME)
        model.verify_metadata(metadata, directory)
        return model.to(map_location if map_location is not None else device).eval()
