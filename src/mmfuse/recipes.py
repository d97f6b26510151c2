"""Named training recipes: small presets of :class:`~mmfuse.train.TrainConfig` overrides.

``mmfuse train --recipe NAME`` (and ``mmfuse ablate --recipe NAME``) start from the preset; a flag given
on the command line still wins over it.

``seed003``: SGD with momentum 0.9, the learning rate divided by 10 every 5 epochs (StepLR), and a
10x learning rate for the cross-attention layers, after the VGG16 + cross-attention write-up in the seeds.
That write-up fine-tunes a pretrained VGG at lr 0.001; mmfuse trains from scratch (nothing is
downloaded), so the preset starts ten times higher, with VGG's usual 5e-4 weight decay and no warmup.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "apply_recipe"]

RECIPES: dict[str, dict[str, Any]] = {
    "seed003": {
        "optimizer": "sgd",
        "momentum": 0.9,
        "lr": 0.01,
        "attention_lr_mult": 10.0,
        "schedule": "step",
        "step_epochs": 5,
        "step_gamma": 0.1,
        "warmup_steps": 0,
        "weight_decay": 5e-4,
    },
}


def apply_recipe(name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (TrainConfig fields) on top of recipe ``name``'s presets; None: ``options`` unchanged."""
    if name is None:
        return dict(options)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return {**RECIPES[name], **options}
