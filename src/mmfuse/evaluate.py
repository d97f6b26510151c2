"""Evaluation: accuracy overall, per answer type and per question kind, predictions, a confusion matrix.

Answers the model's vocabulary lacks (a test answer training never saw) are counted as wrong: the
model cannot produce them.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfuse.data import DataError, ImageGroupedBatches, VQASplit, WordTokenizer, encode_answers
from mmfuse.data.vocab import UNK
from mmfuse.device import autocast
from mmfuse.models.vqa import VQAModel

__all__ = ["EvalResult", "check_split", "evaluate", "unknown_words", "write_answers", "write_predictions"]


def check_split(model: VQAModel, split: VQASplit) -> None:
    """A one-line error when ``split`` gives image tokens the model cannot take, pixels it has no encoder
    for, or pixels brought to square otherwise than the model was trained on (``resize``)."""
    if split.has_features:
        T, D = split.images.shape[1:]
        if D != model.vision_dim:
            raise DataError(f"{split.name}: image features are ({T}, {D}), the model takes (N, {model.vision_dim})")
    elif model.vision is None:
        raise DataError(f"{split.name}: gives images, but the model takes precomputed image_features "
                        f"(N, {model.vision_dim})")
    elif split.resize != model.config.resize:
        raise DataError(f"{split.name}: images were brought to square with resize={split.resize!r}, the model "
                        f"was trained with {model.config.resize!r}; load the split with "
                        f"resize={model.config.resize!r}")


@dataclass
class EvalResult:
    """Per-question predictions of a model on a split; ``summary()`` gives the figures."""

    split: VQASplit
    answer_names: list[str]
    targets: Tensor  # (N,) class ids, -1 for answers outside the model's vocabulary
    predictions: Tensor  # (N,) class ids
    probabilities: Tensor  # (N,) probability of the predicted answer

    @property
    def correct(self) -> Tensor:
        return self.predictions == self.targets

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.targets) else 0.0

    def groups(self, keys: list[str] | None = None) -> dict[str, float]:
        """Accuracy per value of ``keys`` (one per question); default: per answer type when the dataset
        has types, else per expected answer."""
        keys = keys or self.split.answer_types or self.split.answers
        hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for key, ok in zip(keys, self.correct.tolist(), strict=True):
            hits[key][0] += int(ok)
            hits[key][1] += 1
        return {k: h / n for k, (h, n) in sorted(hits.items())}

    @property
    def vqa_accuracy(self) -> float | None:
        """The VQA accuracy, mean of ``min(#annotators who gave the prediction / 3, 1)``, where the split has
        every annotator's answers; None otherwise."""
        lists = self.split.answer_lists
        if lists is None or not lists:
            return None
        names = self.answer_names
        scores = [min(answers.count(names[p]) / 3, 1.0) for answers, p in zip(lists, self.predictions.tolist(),
                                                                              strict=True)]
        return sum(scores) / len(scores)

    def summary(self) -> dict[str, Any]:
        by = "answer_type" if self.split.answer_types else "answer"
        out = {"accuracy": self.accuracy, "num_examples": len(self.targets),
               "unknown_answers": int((self.targets < 0).sum()), f"accuracy_by_{by}": self.groups()}
        if self.split.kinds:
            out["accuracy_by_kind"] = self.groups(self.split.kinds)
        if self.vqa_accuracy is not None:
            out["vqa_accuracy"] = self.vqa_accuracy
        return out

    def confusion(self) -> Tensor:
        """(A, A) counts: row = expected answer, column = predicted (unknown answers left out)."""
        a = len(self.answer_names)
        known = self.targets >= 0
        flat = self.targets[known] * a + self.predictions[known]
        return torch.bincount(flat, minlength=a * a).reshape(a, a)


@torch.no_grad()
def evaluate(model: VQAModel, split: VQASplit, *, images_per_batch: int = 128, precision: str = "fp32",
             bf16: bool = False) -> EvalResult:
    """Run ``model`` over every question of ``split`` (each image encoded once) on the model's device.

    ``precision``: ``fp32``, ``bf16`` or ``fp16`` autocast (``bf16=True`` is the older spelling of bf16).
    Predictions are gathered on the device and copied back once.
    """
    check_split(model, split)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    precision = "bf16" if bf16 else precision
    ids, mask = model.tokenize(split.questions)
    targets = encode_answers(split.answers, model.answers)
    batches = ImageGroupedBatches(split, ids, mask, targets, images_per_batch=images_per_batch, shuffle=False)
    predictions = torch.empty(len(split), dtype=torch.long, device=device)
    probabilities = torch.empty(len(split), device=device)
    try:
        for batch in batches.epoch(0):
            batch = batch.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(batch.images, batch.tokens, batch.text_mask, batch.image_index)
            prob, pred = logits.float().softmax(-1).max(-1)
            predictions[batch.question_ids] = pred
            probabilities[batch.question_ids] = prob
    finally:
        model.train(was_training)
    return EvalResult(split, model.answers.names, targets, predictions.cpu(), probabilities.cpu())


def unknown_words(model: VQAModel, questions: list[str]) -> list[str]:
    """The words of ``questions`` the model's tokenizer never saw in training (read as ``<unk>``), most
    frequent first; empty for a Hugging Face tokenizer (sub-words cover every word)."""
    tokenizer = getattr(model.text, "tokenizer", None)
    if not isinstance(tokenizer, WordTokenizer):
        return []
    counts: Counter[str] = Counter()
    for question in questions:
        words = tokenizer.tokenize(question)
        ids = tokenizer.encode([question], max_length=len(words) + 1)[0][0, 1:].tolist()  # after <cls>
        counts.update(w for w, i in zip(words, ids, strict=True) if i == UNK)
    return [w for w, _ in counts.most_common()]


def write_answers(result: EvalResult, path: str | os.PathLike) -> None:
    """One JSON line per question of a split that may have no answers: question, image, prediction,
    probability (and the answer where the line gave one)."""
    split = result.split
    names = result.answer_names
    columns = (result.predictions.tolist(), result.probabilities.tolist(), split.image_index.tolist())
    with open(Path(path), "w", encoding="utf-8") as f:
        for q, a, pred, prob, image in zip(split.questions, split.answers, *columns, strict=True):
            row = {"question": q, "image": split.image_paths[image], "prediction": names[pred],
                   "probability": round(prob, 6), **({"answer": a} if a else {})}
            f.write(json.dumps(row) + "\n")


def write_predictions(result: EvalResult, path: str | os.PathLike) -> None:
    """One JSON line per question: question, answer, prediction, probability, correct, image."""
    split = result.split
    names = result.answer_names
    # Plain lists: result.correct compares every row, and per-element tensor indexing is slow.
    columns = (result.predictions.tolist(), result.probabilities.tolist(), result.correct.tolist(),
               split.image_index.tolist())
    with open(Path(path), "w", encoding="utf-8") as f:
        for q, a, pred, prob, correct, image in zip(split.questions, split.answers, *columns, strict=True):
            row = {"question": q, "answer": a, "prediction": names[pred], "probability": round(prob, 6),
                   "correct": correct, "image": split.image_paths[image]}
            f.write(json.dumps(row) + "\n")
