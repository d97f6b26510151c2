"""A local Hugging Face vision model (ViT, CLIP / SigLIP vision towers, DINOv2, ConvNeXt, ResNet) as an
mmfuse vision encoder: uint8 images in, tokens out.

Shapes::

    B  images      S  side of the uint8 images given      N  tokens      D  ``out_dim``

    images: (B, 3, S, S) uint8 RGB  ->  tokens: (B, N, D)

Transformers return their last hidden state (patch tokens, with the class / register tokens the model
has); convolutional models their last feature map, one token per position (``flatten(2).transpose(1,
2)``). A CLIP or SigLIP folder holding both towers gives its vision tower.

Preprocessing follows the folder's ``preprocessor_config.json`` (size, centre crop, rescale, mean / std)
and is done in torch on the model's device; :func:`image_size` is the side the data layer should
decode images at (the processor's resize target, before any crop), so images are resized once, by
Pillow, and the crop and normalisation happen here. Nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hf import _import_transformers, freeze_backbone
from .vision import feature_map_to_tokens

__all__ = ["HFVisionEncoder", "ImagePreprocess", "image_size"]

_PROCESSOR_FILE = "preprocessor_config.json"
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes; others fall back to bilinear


@dataclass(frozen=True)
class ImagePreprocess:
    """A processor's settings: resize to ``resize`` (h, w), centre-crop to ``crop`` (h, w) or not, then
    ``(x * scale - mean) / std`` per channel."""

    resize: tuple[int, int]
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255
    mode: str = "bilinear"

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ImagePreprocess:
        """Read ``preprocessor_config.json`` of ``folder``; without one, ImageNet settings at the model's size."""
        path = Path(folder) / _PROCESSOR_FILE
        cfg: dict[str, Any] = {}
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: cannot read the image processor settings ({e})") from e
        size = cfg.get("size", 224)
        crop = None
        if isinstance(size, int):
            resize = (size, size)
        elif "height" in size and "width" in size:
            resize = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            if "crop_pct" in cfg and edge < 384:  # ConvNeXt: resize to edge / crop_pct, crop to edge
                resize, crop = (int(edge / cfg["crop_pct"]),) * 2, (edge, edge)
            else:
                resize = (edge, edge)
        else:
            raise ValueError(f"{path}: unsupported 'size' {size!r} (expected height/width or shortest_edge)")
        if cfg.get("do_center_crop") and "crop_size" in cfg:
            c = cfg["crop_size"]
            crop = (c, c) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        if not cfg.get("do_resize", True):
            raise ValueError(f"{path}: do_resize is false; mmfuse needs one image size per model")
        normalize = cfg.get("do_normalize", True)
        mean = tuple(cfg.get("image_mean", (0.485, 0.456, 0.406))) if normalize else (0.0, 0.0, 0.0)
        std = tuple(cfg.get("image_std", (0.229, 0.224, 0.225))) if normalize else (1.0, 1.0, 1.0)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{path}: image_mean and image_std must have 3 values, got {mean} and {std}")
        scale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        return cls(resize, crop, mean, std, scale, _RESAMPLE.get(cfg.get("resample", 2), "bilinear"))  # type: ignore[arg-type]

    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) uint8 -> (B, 3, h, w) float, normalised."""
        x = images.float()
        if tuple(x.shape[-2:]) != self.resize:
            x = F.interpolate(x, size=self.resize, mode=self.mode, antialias=self.mode != "nearest",
                              align_corners=False if self.mode != "nearest" else None).clamp_(0, 255)
        if self.crop is not None:
            (H, W), (h, w) = x.shape[-2:], self.crop
            top, left = (H - h) // 2, (W - w) // 2  # the processors' centre crop rounds down
            x = x[..., top : top + h, left : left + w]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * self.scale - mean) / std

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def image_size(folder: str | os.PathLike) -> int:
    """The side images should be decoded at for the model in ``folder`` (its processor's resize target)."""
    h, w = ImagePreprocess.from_folder(folder).resize
    return max(h, w)


def _load_vision_model(folder: Path) -> nn.Module:
    transformers = _import_transformers()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "vision_config"):  # a two-tower model (CLIPConfig, SiglipConfig...): its vision tower
        name = type(config).__name__.removesuffix("Config") + "VisionModel"
        cls = getattr(transformers, name, None)
        if cls is None:
            raise ValueError(f"{folder}: {type(config).__name__} has no vision model class {name} in transformers")
        return cls.from_pretrained(folder, local_files_only=True)
    return transformers.AutoModel.from_pretrained(folder, local_files_only=True)


class HFVisionEncoder(nn.Module):
    """A ``transformers`` vision model from a local folder, returning tokens (see the module docstring).

    Args:
        path: the model folder (``config.json``, weights, ``preprocessor_config.json``).
        freeze: no trainable parameters, eval mode even inside ``.train()``, forward without a graph, and
            the weights stay out of the state (a fingerprint instead; see :mod:`mmfuse.encoders.hf`).
    """

    def __init__(self, path: str | os.PathLike, *, freeze: bool = True) -> None:
        super().__init__()
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: {folder / 'config.json'} not found")
        self.path = folder
        self.freeze = freeze
        self.preprocess = ImagePreprocess.from_folder(folder)
        self.model = _load_vision_model(folder)
        config = self.model.config
        hidden = getattr(config, "hidden_size", None)
        sizes = getattr(config, "hidden_sizes", None)
        # A ResNet / ConvNeXt config also has hidden_size (the pooled width), which is its last stage's.
        self.out_dim: int = int(sizes[-1] if sizes else hidden)
        if freeze:
            freeze_backbone(self, folder)
        # N, the tokens an image gives (class and register tokens included): one probe of a blank image.
        h, w = self.preprocess.resize
        with torch.no_grad():
            self.num_tokens: int = int(self(torch.zeros(1, 3, h, w, dtype=torch.uint8)).shape[1])

    def train(self, mode: bool = True) -> HFVisionEncoder:
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        pixels = self.preprocess(images)  # (B, 3, h, w) float
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype)).last_hidden_state
        if hidden.dim() == 4:  # a feature map (B, D, h', w')
            hidden = feature_map_to_tokens(hidden)
        return hidden  # (B, N, D)

    def identity(self) -> str:
        """What the tokens depend on besides the image: the weights and the preprocessing (a cache key)."""
        weights = getattr(self, "backbone_fingerprint", None)
        if weights is None:
            raise ValueError("only a frozen backbone has a fixed identity")
        return bytes(weights.tolist()).hex()[:32] + "-" + self.preprocess.fingerprint()

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, out_dim={self.out_dim}, freeze={self.freeze}"
