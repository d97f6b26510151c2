"""Image classification with an optional text or image context: :class:`ImageClassifier` on JSONL data.

The data format is :mod:`mmfuse.data.classify`; the model :mod:`mmfuse.models.classifier`. Labels are
the training split's (sorted); a test label training never saw is scored as wrong.

Shapes of a batch::

    B  examples    L  longest context in the batch    S  image side

    images: (B, 3, S, S) uint8    labels: (B,) int64, -1 = unknown label    example_ids: (B,) int64
    context_ids, context_mask: (B, L) or None        context_images: (B, 3, S, S) uint8 or None
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfuse.data.classify import ClassifySplit, load_classify_split
from mmfuse.data.storage import ImageStorage
from mmfuse.data.vocab import AnswerVocab, WordTokenizer
from mmfuse.device import autocast
from mmfuse.models.classifier import ImageClassifier, ImageClassifierConfig
from mmfuse.tasks.base import StepOutput, Task

__all__ = ["ClassifyBatch", "ClassifyBatches", "ClassifyResult", "ClassifyTask", "encode_labels"]


def encode_labels(labels: list[str], vocab: AnswerVocab) -> Tensor:
    """Class ids (N,) int64; -1 for a label the model does not know."""
    return torch.tensor([vocab.index(a) for a in labels], dtype=torch.long)


@dataclass
class ClassifyBatch:
    """One step's examples (shapes in the module docstring); absent contexts are None."""

    images: Tensor
    labels: Tensor
    example_ids: Tensor
    context_ids: Tensor | None = None
    context_mask: Tensor | None = None
    context_images: Tensor | None = None

    def _map(self, fn: Any) -> ClassifyBatch:
        return ClassifyBatch(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> ClassifyBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ClassifyBatch:
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return len(self.example_ids)


class ClassifyBatches:
    """Deterministic, resumable, shardable batches of ``batch_size`` examples.

    Each epoch permutes the examples with a generator seeded from ``(seed, epoch)``; every rank takes
    every ``world_size``-th example of the same permutation (the last ``N % world_size`` left out so that
    ranks have as many batches), so ``epoch(e, start=k)`` yields exactly what ``epoch(e)`` yields from k on.
    """

    def __init__(self, split: ClassifySplit, labels: Tensor, *, batch_size: int, context_ids: Tensor | None = None,
                 context_mask: Tensor | None = None, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if tuple(labels.shape) != (len(split),):
            raise ValueError(f"labels must be (N,) = ({len(split)},), got {tuple(labels.shape)}")
        self.split, self.labels = split, labels
        self.context_ids, self.context_mask = context_ids, context_mask
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self._per_rank = len(split) // world_size
        if context_mask is not None:  # one past each context's last real token, to trim batches
            self._text_end = (context_mask * torch.arange(1, context_mask.shape[1] + 1)).amax(1).clamp(min=1)

    def __len__(self) -> int:
        return -(-self._per_rank // self.batch_size)

    def order(self, epoch: int) -> Tensor:
        n = len(self.split)
        if self.shuffle:
            digest = hashlib.sha256(f"mmfuse-classify:{self.seed}:{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        return order[: self._per_rank * self.world_size][self.rank :: self.world_size]

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[ClassifyBatch]:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self.batch(order[b * self.batch_size : (b + 1) * self.batch_size])

    def batch(self, ids: Tensor) -> ClassifyBatch:
        split = self.split
        out = ClassifyBatch(images=split.images[split.image_index[ids]], labels=self.labels[ids], example_ids=ids)
        if self.context_ids is not None and self.context_mask is not None:
            length = int(self._text_end[ids].max())
            out.context_ids = self.context_ids[ids, :length]
            out.context_mask = self.context_mask[ids, :length]
        if split.context_images is not None and split.context_index is not None:
            out.context_images = split.context_images[split.context_index[ids]]
        return out


@dataclass
class ClassifyResult:
    """Per-example predictions of a classifier on a split; ``summary()`` gives the figures."""

    split: ClassifySplit
    label_names: list[str]
    targets: Tensor  # (N,) class ids, -1 for labels the model does not know
    predictions: Tensor  # (N,)
    probabilities: Tensor  # (N,) probability of the predicted class

    @property
    def correct(self) -> Tensor:
        return self.predictions == self.targets

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.targets) else 0.0

    def per_label(self) -> dict[str, float]:
        """Accuracy among the examples of each expected label."""
        hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for label, ok in zip(self.split.labels, self.correct.tolist(), strict=True):
            hits[label][0] += int(ok)
            hits[label][1] += 1
        return {k: h / n for k, (h, n) in sorted(hits.items())}

    @property
    def answer_names(self) -> list[str]:
        """The class names under the name :func:`mmfuse.report.plot_confusion` reads."""
        return self.label_names

    def confusion(self) -> Tensor:
        """(K, K) counts: row = expected label, column = predicted (unknown labels left out)."""
        k = len(self.label_names)
        known = self.targets >= 0
        return torch.bincount(self.targets[known] * k + self.predictions[known], minlength=k * k).reshape(k, k)

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "num_examples": len(self.targets),
                "unknown_labels": int((self.targets < 0).sum()), "accuracy_by_label": self.per_label()}


class ClassifyTask(Task):
    """Image classification; the context (text or image) comes from the data, through the model's encoder."""

    name = "classify"
    model_type = ImageClassifier.model_type
    config_class = ImageClassifierConfig
    metric = "accuracy"
    #: AdamW at easy-VQA's 3e-3 left a width-0.125 VGG16 at chance (loss ln 4) on 10,000 context examples;
    #: at 5e-4 it learns (see the README's seed 003 section)
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 5e-4}

    def load_split(self, data: str, split: str, *, image_size: int | None = None, progress: bool | None = None,
                   storage: ImageStorage | str = "auto") -> ClassifySplit:
        return load_classify_split(data, split, image_size=image_size or 64, progress=progress, storage=storage)

    def build_model(self, options: dict[str, Any], train_split: ClassifySplit) -> ImageClassifier:
        """A classifier over ``train_split``'s labels. Unless ``options`` say otherwise, a VGG reads the
        context the data carries and a ResNet (the baseline) none."""
        options = dict(options)
        backbone = options.get("backbone", ImageClassifierConfig.__dataclass_fields__["backbone"].default)
        options.setdefault("context", train_split.context if backbone.startswith("vgg") else "none")
        if options["context"] != "none" and options["context"] != train_split.context:
            raise ValueError(f"context={options['context']!r}, but {train_split.name} has "
                             f"{train_split.context!r} contexts")
        labels = AnswerVocab(train_split.labels)
        tokenizer = None
        if options["context"] == "text":
            tokenizer = WordTokenizer.fit(train_split.contexts or [])
            options["vocab_size"] = len(tokenizer)
        options.setdefault("image_size", train_split.image_size)
        config = ImageClassifierConfig(num_classes=len(labels), **options)
        return ImageClassifier(config, labels=labels, tokenizer=tokenizer)

    def load_model(self, run_dir: str | os.PathLike, *, device: torch.device | str = "cpu") -> ImageClassifier:
        return ImageClassifier.from_pretrained(run_dir, device=device)

    def batches(self, model: nn.Module, split: ClassifySplit, *, batch_size: int, shuffle: bool = True,
                seed: int = 0, rank: int = 0, world_size: int = 1) -> ClassifyBatches:
        ids = mask = None
        if model.config.context == "text":
            if split.contexts is None:
                raise ValueError(f"the model reads a text context; {split.name} has {split.context!r} contexts")
            ids, mask = model.tokenize(split.contexts)
        elif model.config.context == "image" and split.context_images is None:
            raise ValueError(f"the model reads an image context; {split.name} has {split.context!r} contexts")
        return ClassifyBatches(split, encode_labels(split.labels, model.labels), batch_size=batch_size,
                               context_ids=ids, context_mask=mask, shuffle=shuffle, seed=seed, rank=rank,
                               world_size=world_size)

    def step(self, model: nn.Module, batch: ClassifyBatch) -> StepOutput:
        logits = model(batch.images, batch.context_ids, batch.context_mask, batch.context_images)  # (B, K)
        loss = F.cross_entropy(logits.float(), batch.labels, ignore_index=-1, label_smoothing=self.label_smoothing)
        correct = (logits.argmax(-1) == batch.labels).sum()
        return StepOutput(loss, correct, len(batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: ClassifySplit, *, device: torch.device | str = "cpu",
                 precision: str = "fp32", batch_size: int = 256) -> ClassifyResult:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        batches = self.batches(model, split, batch_size=batch_size, shuffle=False)
        predictions = torch.empty(len(split), dtype=torch.long, device=device)
        probabilities = torch.empty(len(split), device=device)
        try:
            for batch in batches.epoch(0):
                batch = batch.to(device)
                with autocast(device, precision):
                    logits = model(batch.images, batch.context_ids, batch.context_mask, batch.context_images)
                prob, pred = logits.float().softmax(-1).max(-1)
                predictions[batch.example_ids] = pred
                probabilities[batch.example_ids] = prob
        finally:
            model.train(was_training)
        return ClassifyResult(split, model.labels.names, batches.labels, predictions.cpu(), probabilities.cpu())

    def write_predictions(self, result: ClassifyResult, path: str | os.PathLike) -> None:
        """One JSON line per example: image, context, label, prediction, probability, correct."""
        split, names = result.split, result.label_names
        columns = (result.predictions.tolist(), result.probabilities.tolist(), result.correct.tolist(),
                   split.image_index.tolist())
        with open(Path(path), "w", encoding="utf-8") as f:
            for i, (label, pred, prob, ok, image) in enumerate(zip(split.labels, *columns, strict=True)):
                row: dict[str, Any] = {"image": split.image_paths[image]}
                if split.contexts is not None:
                    row["context"] = split.contexts[i]
                if split.context_paths is not None and split.context_index is not None:
                    row["context_image"] = split.context_paths[int(split.context_index[i])]
                row.update(label=label, prediction=names[pred], probability=round(prob, 6), correct=ok)
                f.write(json.dumps(row) + "\n")

