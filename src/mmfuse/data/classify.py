"""Image classification datasets with an optional context: a directory of ``<split>.jsonl`` files.

One JSON object a line (blank lines are skipped)::

    {"image": "images/0001.png", "label": "circle"}
    {"image": "images/0001.png", "label": "square", "context": "the red object"}
    {"image": "images/0001.png", "label": "square", "context_image": "contexts/red.png"}

``context`` (text) and ``context_image`` (a second image) are optional, but a split uses one kind on
every line or none at all. Image paths follow :mod:`mmfuse.data.jsonl`'s rules (relative to the
directory, never leading outside it); every error is a :class:`DataError` naming the file and line.
Lines naming the same image file share one decoded image, as do lines naming the same context image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .images import DataError
from .jsonl import _numbered_lines, _resolve_image, split_file
from .storage import ImageStorage, decoded_images

__all__ = ["ClassifySplit", "ContextKind", "load_classify_split"]

ContextKind = Literal["none", "text", "image"]


@dataclass
class ClassifySplit:
    """Labelled images, each example with an optional text or image context.

    Shapes::

        M  images     K  context images     N  examples     S  image side

        images:         (M, 3, S, S) uint8      image_index:   (N,) int64, example i shows images[image_index[i]]
        context_images: (K, 3, S, S) uint8      context_index: (N,) int64  (both None unless context is "image")

    ``contexts`` holds the text contexts (None unless context is "text"); ``image_paths[m]`` is the file
    row ``m`` was decoded from (``context_paths`` likewise).
    """

    images: Tensor
    image_index: Tensor
    labels: list[str]
    image_paths: list[str]
    name: str
    contexts: list[str] | None = None
    context_images: Tensor | None = None
    context_index: Tensor | None = None
    context_paths: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be uint8 (M, 3, S, S), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        _check_index(self.name, "image_index", self.image_index, n, self.images.shape[0])
        if self.contexts is not None and len(self.contexts) != n:
            raise ValueError(f"{self.name}: {len(self.contexts)} contexts for {n} examples")
        if (self.context_images is None) != (self.context_index is None):
            raise ValueError(f"{self.name}: context_images and context_index come together")
        if self.context_images is not None:
            if self.contexts is not None:
                raise ValueError(f"{self.name}: an example has a text or an image context, not both")
            _check_index(self.name, "context_index", self.context_index, n, self.context_images.shape[0])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def context(self) -> ContextKind:
        """Which context the examples carry: ``"text"``, ``"image"`` or ``"none"``."""
        return "text" if self.contexts is not None else "image" if self.context_images is not None else "none"

    def replace_images(self, images: Tensor, name: str) -> ClassifySplit:
        """The same examples over other images of the same shape (e.g. perturbed ones)."""
        return ClassifySplit(images, self.image_index, self.labels, self.image_paths, name, self.contexts,
                             self.context_images, self.context_index, self.context_paths)


def _check_index(name: str, key: str, index: Tensor | None, n: int, m: int) -> None:
    if index is None or index.dtype != torch.long or tuple(index.shape) != (n,):
        raise ValueError(f"{name}: {key} must be int64 (N,) = ({n},), got "
                         f"{None if index is None else (index.dtype, tuple(index.shape))}")
    if n and not (0 <= int(index.min()) and int(index.max()) < m):
        raise ValueError(f"{name}: {key} out of range [0, {m})")


@dataclass
class _Line:
    line: int
    image: Path
    label: str
    context: str | None
    context_image: Path | None


def load_classify_split(root: str | Path, split: str, *, image_size: int = 64, progress: bool | None = None,
                        storage: ImageStorage | str = "auto") -> ClassifySplit:
    """Load ``root/<split>.jsonl`` (format in the module docstring), images decoded at ``image_size``, in
    memory or on disk as ``storage`` says (:mod:`mmfuse.data.storage`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data {str(root)!r} is not a dataset directory (one holding train.jsonl and test.jsonl)")
    path = split_file(root, split)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (a dataset directory holds train.jsonl, "
                        "test.jsonl and optionally val.jsonl)", path=path)
    base = root.resolve()
    lines = [_parse(path, n, text, base) for n, text in _numbered_lines(path)]
    if not lines:
        raise DataError(f"{path}: no examples", path=path)
    kinds = [("text" if ln.context is not None else "image" if ln.context_image is not None else "none", ln.line)
             for ln in lines]
    for kind, n in kinds[1:]:
        if kind != kinds[0][0]:
            raise DataError(f"{path} line {n}: context {kind!r}, but line {kinds[0][1]} has {kinds[0][0]!r}; "
                            "give the same kind of context on every line", path=path)
    name = f"{base.name}/{split}"

    images, image_index, image_paths = _decode(path, [(ln.image, ln.line) for ln in lines], image_size,
                                               f"{name} images", progress, storage)
    split_kw: dict[str, Any] = {}
    if kinds[0][0] == "text":
        split_kw["contexts"] = [str(ln.context) for ln in lines]
    elif kinds[0][0] == "image":
        ctx, ctx_index, ctx_paths = _decode(path, [(ln.context_image, ln.line) for ln in lines], image_size,
                                            f"{name} contexts", progress, storage)
        split_kw.update(context_images=ctx, context_index=ctx_index, context_paths=ctx_paths)
    return ClassifySplit(images=images, image_index=image_index, labels=[ln.label for ln in lines],
                         image_paths=image_paths, name=name, **split_kw)


def _decode(path: Path, files: list[tuple[Any, int]], size: int, desc: str, progress: bool | None,
            storage: ImageStorage | str) -> tuple[Tensor, Tensor, list[str]]:
    """Each distinct file decoded once: (images (M, 3, S, S), index (N,), paths)."""
    first_line: dict[Path, int] = {}
    for file, line in files:
        first_line.setdefault(file, line)
    row_of = {file: row for row, file in enumerate(first_line)}
    try:
        images = decoded_images(list(first_line), size, desc=desc, progress=progress, storage=storage)
    except DataError as e:
        line = first_line.get(Path(e.path)) if e.path else None
        if line is None:
            raise
        raise DataError(f"{path} line {line}: {e}", path=path) from e
    index = torch.tensor([row_of[file] for file, _ in files], dtype=torch.long)
    return images, index, [str(p) for p in first_line]


def _parse(path: Path, n: int, text: str, base: Path) -> _Line:
    where = f"{path} line {n}"
    try:
        obj: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e}", path=path) from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}", path=path)
    for key in ("image", "label"):
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r}", path=path)
    for key in ("image", "label", "context", "context_image"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}", path=path)
    if not obj["label"]:
        raise DataError(f"{where}: 'label' is empty", path=path)
    if "context" in obj and "context_image" in obj:
        raise DataError(f"{where}: give 'context' (text) or 'context_image', not both", path=path)
    context_image = obj.get("context_image")
    return _Line(n, _resolve_image(where, path, obj["image"], base), obj["label"], obj.get("context"),
                 None if context_image is None else _resolve_image(where, path, context_image, base))
