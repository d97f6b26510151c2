"""Generated text: image captioning (``caption``) and visual questions answered by generation
(``vqa-generate``), both trained on the :class:`~mmfuse.models.captioner.Captioner` decoder.

``caption`` reads a caption dataset (:mod:`mmfuse.data.captions`): one training sequence per
(image, reference) pair, one generated caption per test image, scored by exact match (the normalised
caption equals one of the references), BLEU-4 and CIDEr (pycocoevalcap's scorers on the normalised,
space-tokenised text). ``vqa-generate`` reads a VQA dataset (easy-VQA or a JSONL directory) and generates
each answer from the image and the encoded question, an open vocabulary: accuracy is exact match.

Shapes of a batch::

    I  images    B  sequences    T  decoder tokens    Lq  question tokens

    images: (I, 3, S, S) uint8   image_index: (B,)   ids: (B, T) ``<bos> ... <eos> <pad>...``
    lengths: (B,) tokens of each row up to its ``<eos>`` (a Hugging Face LM's tokenizer pads with ``<eos>``)
    question_ids, question_mask: (B, Lq) (vqa-generate only; empty (B, 0) otherwise)   rows: (B,) split rows

With ``lm`` in the model options (``--lm hf:PATH``) the decoder is a frozen Hugging Face causal LM with
gated cross-attention (:class:`~mmfuse.models.gated_lm.GatedLM`), tokenised with the LM's own tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfuse.data import ImageStorage, WordTokenizer
from mmfuse.data import load_split as load_vqa_split
from mmfuse.data.captions import load_caption_split, normalize_caption
from mmfuse.device import autocast
from mmfuse.encoders.hf import resolve_hf_path
from mmfuse.io import atomic_path
from mmfuse.models.captioner import AnswerGenerator, Captioner, CaptionerConfig, CaptionTokenizer
from mmfuse.models.gated_lm import LMTokenizer, lm_vocab_size
from mmfuse.tasks.base import StepOutput, Task

__all__ = ["CaptionBatch", "CaptionResult", "CaptionTask", "VQAGenerateTask", "caption_scores"]

_EVAL_BATCH = 128  # images generated for at once in evaluation
_IGNORE = -100  # target of the positions after a row's <eos>, which the loss skips


@dataclass
class CaptionBatch:
    images: Tensor
    image_index: Tensor
    ids: Tensor
    lengths: Tensor
    question_ids: Tensor
    question_mask: Tensor
    rows: Tensor

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> CaptionBatch:
        return CaptionBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                               for f in fields(self)})

    def pin_memory(self) -> CaptionBatch:
        return CaptionBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return len(self.rows)


class _SequenceBatches:
    """Shuffled batches of ``batch_size`` sequences, each bringing its image once (shared images encoded once)."""

    def __init__(self, images: Tensor, image_of: Tensor, ids: Tensor, lengths: Tensor, question_ids: Tensor,
                 question_mask: Tensor, *, batch_size: int, shuffle: bool, seed: int, rank: int,
                 world_size: int) -> None:
        self.images, self.image_of, self.ids, self.lengths = images, image_of, ids, lengths
        self.question_ids, self.question_mask = question_ids, question_mask
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        # every rank gets the same number of batches (DDP steps in lockstep); the tail is dropped evenly
        self.num_batches = max(1, len(ids) // (batch_size * world_size)) if world_size > 1 else \
            -(-len(ids) // batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[CaptionBatch]:
        n = len(self.ids)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n))
        for b in range(start, self.num_batches):
            i = b * self.world_size + self.rank
            rows = torch.from_numpy(order[i * self.batch_size:(i + 1) * self.batch_size].copy())
            images, image_index = torch.unique(self.image_of[rows], return_inverse=True)
            lengths = self.lengths[rows]
            ids = self.ids[rows][:, :int(lengths.max())]  # trim the padding this batch does not need
            q_mask = self.question_mask[rows]
            width = int(q_mask.sum(dim=1).max()) if q_mask.shape[1] else 0
            yield CaptionBatch(self.images[images], image_index, ids, lengths, self.question_ids[rows][:, :width],
                               q_mask[:, :width], rows)


@dataclass
class CaptionResult:
    """Generated texts of a split and their scores; ``summary()`` for metrics.jsonl."""

    predictions: list[str]
    references: list[list[str]]
    images: list[str]
    questions: list[str] | None = None
    metric_name: str = "exact_match"

    def exact(self) -> list[bool]:
        return [normalize_caption(p) in {normalize_caption(r) for r in refs}
                for p, refs in zip(self.predictions, self.references, strict=True)]

    def summary(self) -> dict[str, Any]:
        exact = self.exact()
        out: dict[str, Any] = {"exact_match": sum(exact) / max(len(exact), 1), "num_examples": len(exact)}
        if self.questions is None:
            out.update(caption_scores(self.predictions, self.references))
        else:
            out["accuracy"] = out["exact_match"]
        return out


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr(-D) of pycocoevalcap on the normalised texts (no Java tokenizer needed)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:  # an optional dependency: caption quality needs it, training does not
        raise ImportError("caption metrics need pycocoevalcap: pip install 'mmfuse[caption]'") from e
    res = {i: [normalize_caption(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


class CaptionTask(Task):
    """Image captioning with the cross-attention decoder (see the module docstring)."""

    name = "caption"
    model_type = "captioner"
    config_class = CaptionerConfig
    metric = "exact_match"
    _model_class: type[Captioner] = Captioner
    #: training settings of the default recipe (``mmfuse train --task caption``), over TrainConfig's own
    train_defaults: ClassVar[dict[str, Any]] = {"epochs": 7, "images_per_batch": 32, "lr": 3e-3,
                                                  "warmup_steps": 200, "weight_decay": 0.05}

    def load_split(self, data: str, split: str, *, image_size: int | None = None, progress: bool | None = None,
                   storage: ImageStorage | str = "auto") -> Any:
        return load_caption_split(data, split, image_size=image_size or 64, progress=progress, storage=storage)

    # hooks the answer-generating task overrides ------------------------------------------------------
    def _texts(self, split: Any) -> tuple[Tensor, list[str], list[str] | None]:
        """Training sequences: (image of each, text of each, question of each | None)."""
        image_of = [i for i, refs in enumerate(split.captions) for _ in refs]
        return torch.tensor(image_of, dtype=torch.long), [c for refs in split.captions for c in refs], None

    def _eval_rows(self, split: Any) -> tuple[Tensor, list[list[str]], list[str] | None, list[str]]:
        """What is generated in evaluation: (image of each, references, question | None, image name)."""
        return torch.arange(len(split)), split.captions, None, split.image_paths

    def _question_tokenizer(self, split: Any) -> WordTokenizer | None:
        return None

    # ---------------------------------------------------------------------------------------------------
    def build_model(self, options: dict[str, Any], train_split: Any) -> Captioner:
        options = dict(options)
        _, texts, _ = self._texts(train_split)
        lm = options.get("lm")
        if lm is not None:  # the LM's own tokenizer and vocabulary
            folder = lm[3:] if lm.startswith("hf:") else lm
            tokenizer: CaptionTokenizer | LMTokenizer = LMTokenizer.load(resolve_hf_path(folder))
            vocab_size = lm_vocab_size(folder)
        else:
            tokenizer = CaptionTokenizer.fit(texts)
            vocab_size = len(tokenizer)
        questions = self._question_tokenizer(train_split)
        options.setdefault("image_size", train_split.image_size)
        config = CaptionerConfig(vocab_size=vocab_size, question_vocab_size=len(questions) if questions else 0,
                                 **options)
        return self._model_class(config, tokenizer=tokenizer, question_tokenizer=questions)

    def load_model(self, run_dir: str | os.PathLike, *, device: torch.device | str = "cpu") -> Captioner:
        return self._model_class.from_pretrained(run_dir, device=device)

    def batches(self, model: nn.Module, split: Any, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> _SequenceBatches:
        image_of, texts, questions = self._texts(split)
        ids = model.tokenizer.encode(texts, max_length=model.config.max_length)
        # through the first <eos> after <bos> (GPT-2's <bos> is its <eos>); every encoded row has one
        lengths = (ids[:, 1:] == model.tokenizer.eos_id).int().argmax(dim=1) + 2
        if questions is not None:
            q_ids, q_mask = model.tokenize_questions(questions)
        else:
            q_ids, q_mask = torch.zeros(len(texts), 0, dtype=torch.long), torch.zeros(len(texts), 0, dtype=torch.bool)
        return _SequenceBatches(split.images, image_of, ids, lengths, q_ids, q_mask, batch_size=batch_size,
                                shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)

    def step(self, model: nn.Module, batch: CaptionBatch) -> StepOutput:
        questions = (batch.question_ids, batch.question_mask) if batch.question_ids.shape[1] else (None, None)
        logits = model(batch.images, batch.ids[:, :-1], batch.image_index, *questions)  # (B, T-1, V)
        target = batch.ids[:, 1:]
        scored = torch.arange(target.shape[1], device=target.device) < (batch.lengths - 1)[:, None]  # up to <eos>
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.masked_fill(~scored, _IGNORE).flatten(),
                               ignore_index=_IGNORE, label_smoothing=self.label_smoothing)
        # a sequence counts as right when every one of its tokens is (teacher-forced)
        correct = ((logits.argmax(-1) == target) | ~scored).all(dim=1).sum()
        return StepOutput(loss, correct, len(batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Any, *, device: torch.device | str = "cpu",
                 precision: str = "fp32", **decoding: Any) -> CaptionResult:
        was_training = model.training
        model.eval()
        device = torch.device(device)
        image_of, references, questions, names = self._eval_rows(split)
        predictions: list[str] = []
        try:
            for start in range(0, len(image_of), _EVAL_BATCH):
                rows = image_of[start:start + _EVAL_BATCH]
                images = split.images[rows].to(device)
                qs = questions[start:start + _EVAL_BATCH] if questions is not None else None
                with autocast(device, precision):
                    texts, _ = model.generate(images, qs, **decoding)
                predictions += texts
        finally:
            model.train(was_training)
        return CaptionResult(predictions, [list(r) for r in references], names, questions,
                             "accuracy" if questions is not None else "exact_match")

    def write_predictions(self, result: CaptionResult, path: str | os.PathLike) -> None:
        """One line per evaluated example in the split's order: ``{"image", "prediction", "references"}``
        (vqa-generate: ``{"image", "question", "answer", "prediction"}``)."""
        lines = []
        for i, prediction in enumerate(result.predictions):
            if result.questions is None:
                row = {"image": result.images[i], "prediction": prediction, "references": result.references[i]}
            else:
                row = {"image": result.images[i], "question": result.questions[i],
                       "answer": result.references[i][0], "prediction": prediction}
            lines.append(json.dumps(row))
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


class VQAGenerateTask(CaptionTask):
    """VQA with generated answers (open vocabulary): the decoder attends over the image and the question."""

    name = "vqa-generate"
    model_type = "answer-generator"
    metric = "accuracy"
    _model_class = AnswerGenerator
    train_defaults: ClassVar[dict[str, Any]] = {}

    def load_split(self, data: str, split: str, *, image_size: int | None = None, progress: bool | None = None,
                   storage: ImageStorage | str = "auto") -> Any:
        return load_vqa_split(data, split, image_size=image_size or 64, progress=progress, storage=storage)

    def _texts(self, split: Any) -> tuple[Tensor, list[str], list[str] | None]:
        return split.image_index, list(split.answers), list(split.questions)

    def _eval_rows(self, split: Any) -> tuple[Tensor, list[list[str]], list[str] | None, list[str]]:
        paths = getattr(split, "image_paths", None)
        names = [paths[i] if paths else str(i) for i in split.image_index.tolist()]
        return split.image_index, [[a] for a in split.answers], list(split.questions), names

    def _question_tokenizer(self, split: Any) -> WordTokenizer:
        return WordTokenizer.fit(split.questions)

