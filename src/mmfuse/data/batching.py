"""Image-grouped batches: a batch is a set of images with *all* their questions.

An image is then encoded once per step however many questions it has (about 10 in easy-VQA), and the
model maps each question to its image with ``image_index``.

Shapes::

    I  images in the batch    Q  questions in the batch    L  longest question in the batch
    S  image side

    images: (I, 3, S, S) uint8      image_index: (Q,) int64 in [0, I)
    tokens: (Q, L) int64            text_mask: (Q, L) bool, True = real token
    answers: (Q,) int64, -1 = an answer outside the vocabulary
    question_ids: (Q,) int64, positions in the split
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from .disk import DiskRows
from .split import VQASplit
from .vocab import AnswerVocab

__all__ = ["Batch", "ImageGroupedBatches", "encode_answers"]


def encode_answers(answers: Sequence[str], vocab: AnswerVocab) -> Tensor:
    """Class ids ``(N,)`` int64; -1 for an answer the vocabulary lacks (scored as wrong by the evaluator)."""
    return torch.tensor([vocab.index(a) for a in answers], dtype=torch.long)


@dataclass
class Batch:
    """One step's data, on the CPU until :meth:`to`; shapes in the module docstring."""

    images: Tensor
    image_index: Tensor
    tokens: Tensor
    text_mask: Tensor
    answers: Tensor
    question_ids: Tensor

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory, so ``to(cuda, non_blocking=True)`` overlaps with compute."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return len(self.question_ids)


class ImageGroupedBatches:
    """Deterministic, resumable, shardable batches of ``images_per_batch`` images and all their questions.

    Each epoch permutes the images with a ``torch.Generator`` seeded from ``(seed, epoch)`` (no shuffle:
    image order), so ``epoch(e, start=k)`` yields exactly the batches from ``k`` on that
    ``epoch(e)`` yields: a run resumed mid-epoch sees what an uninterrupted run would have.

    Sharding: every rank draws the same permutation and takes every ``world_size``-th image from
    position ``rank``, so ranks hold disjoint images. To give every rank the same number of images, and
    so the same number of batches, the last ``len % world_size`` images of the permutation are left out
    of that epoch (fewer than ``world_size`` images; a different few each epoch when shuffling). Images
    that no question refers to are never batched. With ``drop_last`` a rank's final, partial batch is
    dropped.

    ``tokens`` and ``text_mask`` are the whole split's encoded questions, ``(N, L_max)``; each batch is
    trimmed to its longest question.
    """

    def __init__(
        self,
        split: VQASplit,
        tokens: Tensor,
        text_mask: Tensor,
        answers: Tensor,
        *,
        images_per_batch: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n = len(split)
        if (tokens.dim() != 2 or tokens.shape[0] != n or tokens.shape[1] < 1
                or tuple(text_mask.shape) != tuple(tokens.shape)):
            raise ValueError(f"tokens and text_mask must both be (N, L) with N = {n} questions, L >= 1, got "
                             f"{tuple(tokens.shape)} and {tuple(text_mask.shape)}")
        if text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask must be bool (True = real token), got {text_mask.dtype}")
        if tuple(answers.shape) != (n,):
            raise ValueError(f"answers must be (N,) = ({n},), got {tuple(answers.shape)}")
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

        self.split = split
        self.images_per_batch, self.shuffle, self.seed = images_per_batch, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size

        # Batches are gathered with numpy: its indexing runs on the calling thread, whereas torch's wakes
        # the intra-op thread pool for every small op, which costs milliseconds per batch whenever the
        # cores are busy (0.35 ms against 22 ms for a 64-image easy-VQA batch on a loaded 2-core machine).
        self._images = split.images.reshape(split.images.shape[0], -1).numpy()  # (M, 3*S*S)
        # Images in a file on disk are read with pread, batch by batch, so the process's memory stays flat
        # over an epoch however large the file (see mmfuse.data.disk).
        self._disk_rows: DiskRows | None = getattr(split.images, "disk_rows", None)
        self._fd: int | None = None
        self._tokens, self._text_mask = tokens.cpu().numpy(), text_mask.cpu().numpy()
        self._answers = answers.cpu().numpy()

        # CSR layout: the questions of image m are question_order[offsets[m] : offsets[m] + counts[m]].
        image_index = split.image_index.numpy()
        self._counts = np.bincount(image_index, minlength=split.images.shape[0])  # (M,)
        self._offsets = np.cumsum(self._counts) - self._counts  # (M,)
        self._question_order = np.argsort(image_index, kind="stable")  # (N,)
        self._used_images = torch.from_numpy(np.flatnonzero(self._counts))  # (M_used,) images with questions
        # One past the last real token of each question, to trim each batch to its longest question.
        self._text_end = (self._text_mask * np.arange(1, tokens.shape[1] + 1)).max(1, initial=1)  # (N,)

        self._images_per_rank = len(self._used_images) // world_size

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        full, rest = divmod(self._images_per_rank, self.images_per_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def image_order(self, epoch: int) -> Tensor:
        """This rank's image rows for ``epoch``, in batch order."""
        used = self._used_images
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
            used = used[torch.randperm(len(used), generator=generator)]
        return used[: self._images_per_rank * self.world_size][self.rank :: self.world_size]

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch ``start`` on."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        order = self.image_order(epoch).numpy()
        size = self.images_per_batch
        for b in range(start, len(self)):
            yield self._batch(order[b * size : (b + 1) * size])

    def _batch(self, image_rows: np.ndarray) -> Batch:
        counts = self._counts[image_rows]  # (I,)
        local_image = np.repeat(np.arange(len(image_rows)), counts)  # (Q,) 0,0,..,1,1,..: image within batch
        run_start = np.cumsum(counts) - counts  # (I,) where each image's questions begin among the Q
        within = np.arange(len(local_image)) - run_start[local_image]  # (Q,) rank among its image's questions
        question_ids = self._question_order[self._offsets[image_rows][local_image] + within]  # (Q,)
        length = int(self._text_end[question_ids].max())
        if self._disk_rows is not None:
            if self._fd is None:
                self._fd = os.open(self._disk_rows.path, os.O_RDONLY)
            images = self._disk_rows.gather(image_rows, self._fd)  # (I, ...)
        else:
            images = self._images[image_rows].reshape(len(image_rows), *self.split.images.shape[1:])
        return Batch(
            images=torch.from_numpy(images),  # (I, 3, S, S)
            image_index=torch.from_numpy(local_image),
            tokens=torch.from_numpy(self._tokens[question_ids, :length]),  # (Q, L)
            text_mask=torch.from_numpy(self._text_mask[question_ids, :length]),  # (Q, L)
            answers=torch.from_numpy(self._answers[question_ids]),
            question_ids=torch.from_numpy(question_ids),
        )


def _mix(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch): nearby pairs give unrelated permutations."""
    digest = hashlib.sha256(f"mmfuse:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
