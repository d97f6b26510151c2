"""Visual question answering as answer classification: easy-VQA or a JSONL directory, :class:`VQAModel`."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.data import AnswerVocab, ImageGroupedBatches, VQASplit, WordTokenizer, encode_answers, load_split
from mmfuse.data.batching import Batch
from mmfuse.data.feature_cache import cached_image_tokens
from mmfuse.data.storage import ImageStorage
from mmfuse.evaluate import EvalResult, check_split, evaluate, write_predictions
from mmfuse.models.vqa import VQAConfig, VQAModel
from mmfuse.tasks.base import StepOutput, Task

__all__ = ["VQATask", "check_split", "with_cached_tokens"]


def with_cached_tokens(model: VQAModel, split: VQASplit) -> VQASplit:
    """``split`` checked against ``model``; with a frozen pretrained backbone, its images replaced by the
    backbone's tokens from the feature cache (:mod:`mmfuse.data.feature_cache`)."""
    check_split(model, split)
    vision = model.vision
    if split.has_features or not getattr(vision, "freeze", False) or not hasattr(vision, "identity"):
        return split
    return cached_image_tokens(vision, split, device=next(model.parameters()).device)


class VQATask(Task):
    """Answer classification over the training split's answers; batches group questions by image."""

    name = "vqa"
    model_type = "vqa"
    config_class = VQAConfig
    metric = "accuracy"

    load_fields = ("image_size", "resize")

    def load_split(self, data: str, split: str, *, image_size: int | None = None, progress: bool | None = None,
                   storage: ImageStorage | str = "auto", resize: str = "squash") -> VQASplit:
        return load_split(data, split, image_size=image_size or 64, progress=progress, resize=resize,
                          storage=storage)

    def build_model(self, options: dict[str, Any], train_split: VQASplit) -> VQAModel:
        options = dict(options)
        answers = AnswerVocab(train_split.answers)
        tokenizer = None
        if options.get("text", "transformer") == "transformer":
            tokenizer = WordTokenizer.fit(train_split.questions)
            options["vocab_size"] = len(tokenizer)
        if train_split.has_features:  # precomputed image tokens: the model has no vision encoder
            if options.get("vision", "features") != "features":
                raise ValueError(f"{train_split.name} gives image_features, which replace the vision encoder; "
                                 f"drop --vision {options['vision']}")
            options["vision"], options["feature_dim"] = "features", int(train_split.images.shape[-1])
        else:
            options.setdefault("image_size", train_split.image_size)
            options.setdefault("resize", train_split.resize)
        if options.get("fusion", "fusion_transformer") == "fusion_transformer":
            # A new model's co-attention may attend to a null key (mmfuse.layers.CrossAttention): without it the
            # default easy-VQA run stayed on the yes/no plateau at 94.7% for one seed of three (README, "Results").
            # Saved models keep the options they were saved with.
            options["fusion_options"] = {"null_key": True, **(options.get("fusion_options") or {})}
        config = VQAConfig(num_answers=len(answers), **options)
        return VQAModel(config, answers=answers, tokenizer=tokenizer)

    def load_model(self, run_dir: str | os.PathLike, *, device: torch.device | str = "cpu") -> VQAModel:
        return VQAModel.from_pretrained(run_dir, device=device)

    def batches(self, model: nn.Module, split: VQASplit, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> ImageGroupedBatches:
        split = with_cached_tokens(model, split)
        ids, mask = model.tokenize(split.questions)
        answers = encode_answers(split.answers, model.answers)
        return ImageGroupedBatches(split, ids, mask, answers, images_per_batch=batch_size, shuffle=shuffle,
                                   seed=seed, rank=rank, world_size=world_size)

    def step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images, batch.tokens, batch.text_mask, batch.image_index)  # (Q, A)
        loss = F.cross_entropy(logits.float(), batch.answers, ignore_index=-1,
                               label_smoothing=self.label_smoothing)
        correct = (logits.argmax(-1) == batch.answers).sum()
        return StepOutput(loss, correct, len(batch))

    def evaluate(self, model: nn.Module, split: VQASplit, *, device: torch.device | str = "cpu",
                 precision: str = "fp32") -> EvalResult:
        return evaluate(model, with_cached_tokens(model, split), precision=precision)

    def write_predictions(self, result: EvalResult, path: str | os.PathLike) -> None:
        write_predictions(result, path)
