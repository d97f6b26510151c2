"""Tiny random-weight Hugging Face models, saved to a folder: vision models with their image processor
settings, and a text encoder with its tokenizer.

The real loading code (``from_pretrained(folder, local_files_only=True)``) then runs on models the tests
make; nothing is downloaded. Each ``save_*`` returns the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY", "save_bert", "save_clip_vision", "save_convnext", "save_dinov2", "save_vit"]

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "shape", "is", "the", "there", "a", "red",
         "circle", "?"]


def save_bert(folder: str | Path, seed: int = 0) -> Path:
    """A one-layer BERT (32 wide) with a word-piece tokenizer over :data:`WORDS`."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS), max_position_embeddings=64, **TINY)
    transformers.BertModel(config).save_pretrained(folder)
    return folder

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def save_vit(folder: str | Path, seed: int = 0, size: int = 32) -> Path:
    import transformers

    torch.manual_seed(seed)
    transformers.ViTModel(transformers.ViTConfig(image_size=size, patch_size=8, **TINY)).save_pretrained(folder)
    transformers.ViTImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    return Path(folder)


def save_clip_vision(folder: str | Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(image_size=32, patch_size=8, **TINY)
    transformers.CLIPVisionModel(config).save_pretrained(folder)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
                                       ).save_pretrained(folder)
    return Path(folder)


def save_dinov2(folder: str | Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(image_size=32, patch_size=8, **TINY)).save_pretrained(folder)
    transformers.BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
                                      ).save_pretrained(folder)
    return Path(folder)


def save_convnext(folder: str | Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    transformers.ConvNextModel(config).save_pretrained(folder)
    transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return Path(folder)
