"""The in-memory form of one dataset split, shared by every loader."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["VQASplit", "majority_answer_accuracy"]


@dataclass
class VQASplit:
    """Questions over a set of images, the images decoded once and shared between their questions.

    Shapes::

        M  images      N  questions      S  image side

        images:      (M, 3, S, S) uint8 RGB, or (M, T, D) float image tokens (precomputed features)
        image_index: (N,) int64, question i is about images[image_index[i]]

    ``answer_types`` is per question ("yes/no", "color", "shape" for easy-VQA) or None when the dataset
    gives none; ``kinds`` is a per-question family (Sort-of-CLEVR's "relational" / "non-relational") or
    None; ``image_paths[m]`` is the file row ``m`` was decoded from. ``answer_lists`` holds every
    annotator's answer per question where the dataset gives several (``answers`` is then the most common),
    for the VQA accuracy; None otherwise.
    """

    images: Tensor
    image_index: Tensor
    questions: list[str]
    answers: list[str]
    answer_types: list[str] | None
    image_paths: list[str]
    name: str
    kinds: list[str] | None = None
    answer_lists: list[list[str]] | None = None
    resize: str = "squash"  # how the images were brought to S x S (mmfuse.data.images)

    def __post_init__(self) -> None:
        n, m = len(self.questions), len(self.image_paths)
        pixels = self.images.dtype == torch.uint8 and self.images.dim() == 4 and self.images.shape[1] == 3
        tokens = self.images.is_floating_point() and self.images.dim() == 3
        if not (pixels or tokens):
            raise ValueError(f"{self.name}: images must be uint8 (M, 3, S, S) or float tokens (M, T, D), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.images.shape[0] != m:
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but {m} image paths")
        if self.image_index.dtype != torch.long or tuple(self.image_index.shape) != (n,):
            raise ValueError(f"{self.name}: image_index must be int64 (N,) = ({n},), got "
                             f"{self.image_index.dtype} {tuple(self.image_index.shape)}")
        if n and not (0 <= int(self.image_index.min()) and int(self.image_index.max()) < m):
            raise ValueError(f"{self.name}: image_index out of range [0, {m})")
        if (len(self.answers) != n or (self.answer_types is not None and len(self.answer_types) != n)
                or (self.answer_lists is not None and len(self.answer_lists) != n)):
            raise ValueError(f"{self.name}: questions, answers and answer_types differ in length")
        if self.kinds is not None and len(self.kinds) != n:
            raise ValueError(f"{self.name}: {len(self.kinds)} kinds for {n} questions")

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def has_features(self) -> bool:
        """Whether ``images`` holds image tokens (M, T, D) rather than pixels."""
        return self.images.is_floating_point()

    @property
    def image_size(self) -> int:
        """The side S of the images; 0 for a split of image tokens."""
        return 0 if self.has_features else int(self.images.shape[-1])

    def first_images(self, num_images: int) -> VQASplit:
        """The first ``num_images`` images and all of their questions (a slice for quick experiments)."""
        keep = torch.nonzero(self.image_index < num_images).flatten().tolist()
        return VQASplit(
            images=self.images[:num_images], image_index=self.image_index[keep],
            questions=[self.questions[i] for i in keep], answers=[self.answers[i] for i in keep],
            answer_types=None if self.answer_types is None else [self.answer_types[i] for i in keep],
            image_paths=self.image_paths[:num_images], name=f"{self.name}[:{num_images} images]",
            kinds=None if self.kinds is None else [self.kinds[i] for i in keep],
            answer_lists=None if self.answer_lists is None else [self.answer_lists[i] for i in keep],
            resize=self.resize)


def majority_answer_accuracy(train: VQASplit, test: VQASplit) -> float:
    """Accuracy on ``test`` of always answering the most common training answer (a floor for any model)."""
    if not len(train) or not len(test):
        raise ValueError("majority_answer_accuracy needs non-empty splits")
    counts = Counter(train.answers)
    majority = min(counts, key=lambda a: (-counts[a], a))  # ties broken alphabetically
    return sum(a == majority for a in test.answers) / len(test)
