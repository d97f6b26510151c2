"""The task interface: what the trainer asks of a task, so one loop trains every kind of model.

A task knows its data (how a split is loaded and batched), its model (how one is built for a training
split), its loss and its evaluation. The :class:`~mmfuse.train.Trainer` owns only the loop, optimiser,
schedule, precision, device, checkpoints and progress.

A batch is any object with ``to(device, non_blocking=...)``, ``pin_memory()`` and ``__len__`` (the
number of examples it scores); ``Batches`` yields them, deterministically for a (seed, epoch) so that a
run resumed mid-epoch sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from mmfuse.data.storage import ImageStorage
from mmfuse.layers import CrossAttention

__all__ = ["Batches", "EvalOutput", "StepOutput", "Task", "attention_l2", "attention_modules"]


def attention_modules(model: nn.Module) -> list[CrossAttention]:
    return [m for m in model.modules() if isinstance(m, CrossAttention)]


def attention_l2(model: nn.Module) -> Tensor:
    """Sum of squared weights of every attention projection (the source documents' L2 tip)."""
    terms = [proj.weight.pow(2).sum() for m in attention_modules(model)
             for proj in (m.q_proj, m.k_proj, m.v_proj, m.out_proj)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class Batches(Protocol):
    """An epoch's batches on this rank: ``len()`` batches, ``epoch(e, start=k)`` from batch ``k`` on."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[Any]: ...


@dataclass
class StepOutput:
    """One training step's loss, and the step's tallies as tensors (summed on the device, read rarely)."""

    loss: Tensor  # scalar, the mean over the batch's examples
    correct: Tensor  # scalar count of examples scored right (0 where the task has no such notion)
    count: int  # examples in the batch


class EvalOutput(Protocol):
    """What ``Task.evaluate`` returns: ``summary()`` holds numbers (and dicts of numbers) for metrics.jsonl."""

    def summary(self) -> dict[str, Any]: ...


class Task(abc.ABC):
    """One kind of training: VQA answer classification, image classification with context, captioning...

    ``label_smoothing`` applies to the task's cross-entropy; ``attention_l2`` weighs an L2 penalty on the
    attention projections (:meth:`regularizer`). The trainer passes both from its settings.
    """

    name: ClassVar[str]
    #: the ``model_type`` of the models this task trains (see :mod:`mmfuse.models.base`)
    model_type: ClassVar[str]
    #: the model's config dataclass: ``build_model``'s options are its fields (the CLI's model flags too)
    config_class: ClassVar[type]
    #: the key of ``summary()`` that says how good a model is (e.g. ``accuracy``)
    metric: ClassVar[str] = "accuracy"
    #: the task's own training recipe (TrainConfig fields) under a preset and the command line's flags
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: the model config's fields that say how a split's images are decoded: :meth:`load_split` takes them
    #: by name, so a split is decoded once, as the model takes it (see :meth:`load_options`)
    load_fields: ClassVar[tuple[str, ...]] = ("image_size",)

    def __init__(self, *, label_smoothing: float = 0.0, attention_l2: float = 0.0) -> None:
        self.label_smoothing = label_smoothing
        self.attention_l2 = attention_l2

    @abc.abstractmethod
    def load_split(self, data: str, split: str, *, image_size: int | None = None, progress: bool | None = None,
                   storage: ImageStorage | str = "auto") -> Any:
        """The split ``split`` of ``data`` (a dataset name or directory), images at ``image_size``, held in
        memory or on disk as ``storage`` says (:class:`~mmfuse.data.storage.ImageStorage`)."""

    def load_options(self, config: Any) -> dict[str, Any]:
        """The keyword arguments of :meth:`load_split` that decode images the way a model with ``config``
        takes them: its :attr:`load_fields` that are set. ``config`` is a model config, a model (its
        ``config``) or the dict of options given to :meth:`build_model`."""
        config = getattr(config, "config", config)
        get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
        return {name: get(name) for name in self.load_fields if get(name) is not None}

    @abc.abstractmethod
    def build_model(self, options: dict[str, Any], train_split: Any) -> nn.Module:
        """A new model for ``train_split`` (vocabularies, label sets come from it); ``options`` are the
        model config's fields set by the user."""

    @abc.abstractmethod
    def load_model(self, run_dir: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
        """The model saved in ``run_dir`` (``from_pretrained``), on ``device``, in eval mode."""

    @abc.abstractmethod
    def batches(self, model: nn.Module, split: Any, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> Batches:
        """Batches of ``split`` for ``model`` (tokenised with the model's own tokenizer)."""

    @abc.abstractmethod
    def step(self, model: nn.Module, batch: Any) -> StepOutput:
        """Forward ``batch`` (already on the device) through ``model`` (maybe wrapped in DDP) and score it."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: Any, *, device: torch.device | str = "cpu",
                 precision: str = "fp32") -> EvalOutput:
        """Score ``model`` on every example of ``split``."""

    def write_predictions(self, result: Any, path: str | os.PathLike) -> None:
        """One JSON line per example of the evaluated split."""
        raise NotImplementedError(f"task {self.name!r} does not write predictions")

    def regularizer(self, model: nn.Module) -> Tensor | None:
        """An extra term added to the loss: the L2 on attention projections, or None."""
        return self.attention_l2 * attention_l2(model) if self.attention_l2 else None
