"""Image and text perturbations at severities 0 (clean) to 5 (severe), for robustness evaluation.

Every perturbation is a pure function ``f(x, severity, generator)`` returning a new object of the same
kind, the same for the same generator state::

    image perturbations:  images (M, 3, S, S) uint8   ->  (M, 3, S, S) uint8
    text perturbations:   questions list[str] (N,)    ->  list[str] (N,), a non-empty question stays non-empty

Each one draws the same random numbers whatever the severity: the noise of severity 3 is the noise of
severity 1 scaled up, the grey square of severity 3 contains the one of severity 1, a word dropped at
severity 2 is dropped at severity 3 as well. A curve then shows the effect of severity, not the luck of
a fresh draw at each point.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MAX_SEVERITY",
    "PERTURBATIONS",
    "SEVERITIES",
    "Perturbation",
    "blur",
    "contrast",
    "gaussian_noise",
    "get_perturbation",
    "occlusion",
    "rotation",
    "typos",
    "word_drop",
    "word_swap",
]

MAX_SEVERITY = 5
SEVERITIES = tuple(range(MAX_SEVERITY + 1))

# Strength per severity 0..5.
_NOISE_STD = (0.0, 10.0, 20.0, 35.0, 55.0, 80.0)  # on the 0..255 pixel scale
_BLUR_SIGMA = (0.0, 0.75, 1.25, 2.0, 3.0, 4.0)  # pixels of a 64-pixel image, scaled with the image side
_CONTRAST = (1.0, 0.6, 0.4, 0.25, 0.15, 0.08)  # factor on each image's distance to its mean
_ROTATION_DEGREES = (0.0, 8.0, 16.0, 25.0, 35.0, 45.0)
_OCCLUDED_AREA = (0.0, 0.05, 0.1, 0.2, 0.3, 0.45)  # fraction of the image under the grey square
_WORD_RATE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # chance per word (typos, word_drop) or word pair (word_swap)
_GREY, _WHITE = 128.0, 255.0
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TYPO_WORD = re.compile(r"[^\W\d_]{2,}")  # runs of two or more letters


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an int in 0..{MAX_SEVERITY}, got {severity!r}")


def _check_images(images: Tensor, severity: int) -> None:
    _check_severity(severity)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (M, 3, S, S), got {images.dtype} {tuple(images.shape)}")


def _check_questions(questions: Sequence[str], severity: int) -> None:
    _check_severity(severity)
    if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
        raise ValueError("questions must be a sequence of strings")


def _to_uint8(x: Tensor) -> Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# image perturbations: (M, 3, S, S) uint8 -> (M, 3, S, S) uint8


def gaussian_noise(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Add Gaussian noise to every pixel and channel (std 10 to 80 on the 0..255 scale)."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    noise = torch.randn(images.shape, generator=generator)  # (M, 3, S, S)
    return _to_uint8(images.float() + _NOISE_STD[severity] * noise)


def blur(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Gaussian blur, as two 1-D convolutions; sigma grows with severity and with the image side."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    side = images.shape[-1]
    sigma = _BLUR_SIGMA[severity] * side / 64
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()  # (K,)
    K = kernel.numel()
    # Border pixels repeat outwards, so the edges do not darken as zero padding would make them.
    x = F.pad(images.float(), (radius,) * 4, mode="replicate")  # (M, 3, S + 2r, S + 2r)
    x = F.conv2d(x, kernel.view(1, 1, 1, K).expand(3, 1, 1, K), groups=3)  # (M, 3, S + 2r, S)
    x = F.conv2d(x, kernel.view(1, 1, K, 1).expand(3, 1, K, 1), groups=3)  # (M, 3, S, S)
    return _to_uint8(x)


def contrast(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Pull each image towards its own mean grey level (factor 0.6 down to 0.08)."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    x = images.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (M, 1, 1, 1)
    return _to_uint8((x - mean) * _CONTRAST[severity] + mean)


def rotation(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Rotate each image about its centre by 8 to 45 degrees, direction drawn per image; corners white."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    M = images.shape[0]
    sign = torch.randint(0, 2, (M,), generator=generator).float() * 2 - 1  # (M,)
    angle = sign * math.radians(_ROTATION_DEGREES[severity])
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(M)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1),
                         torch.stack([sin, cos, zero], -1)], 1)  # (M, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (M, S, S, 2)
    # grid_sample fills outside the image with 0; sampling (x - 255) makes that fill white.
    out = F.grid_sample(images.float() - _WHITE, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # (M, 3, S, S)
    return _to_uint8(out + _WHITE)


def occlusion(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Paint a grey square over 5% to 45% of each image, at a position drawn per image."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    M, _, H, W = images.shape
    u = torch.rand((M, 2), generator=generator)  # (M, 2): where along y and x, in [0, 1)
    side_y = max(1, round(H * math.sqrt(_OCCLUDED_AREA[severity])))
    side_x = max(1, round(W * math.sqrt(_OCCLUDED_AREA[severity])))
    # start = floor(u * (free + 1)): with u fixed, a larger square contains the smaller one.
    y0 = (u[:, 0] * (H - side_y + 1)).long()  # (M,)
    x0 = (u[:, 1] * (W - side_x + 1)).long()  # (M,)
    rows, cols = torch.arange(H), torch.arange(W)
    in_y = (rows >= y0[:, None]) & (rows < y0[:, None] + side_y)  # (M, H)
    in_x = (cols >= x0[:, None]) & (cols < x0[:, None] + side_x)  # (M, W)
    covered = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (M, 1, H, W)
    return torch.where(covered, torch.tensor(int(_GREY), dtype=torch.uint8), images)


# --------------------------------------------------------------------------------------------------
# text perturbations: list[str] -> list[str]


def _typo(word: str, op: float, where: float, letter: float) -> str:
    """One edit of ``word`` (>= 2 characters): swap two neighbours, replace one, or drop one."""
    i = int(where * (len(word) - 1))
    if op < 1 / 3 and word[i] != word[i + 1]:  # a swap of equal letters would change nothing
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    i = int(where * len(word))
    if op < 2 / 3:
        others = [c for c in _LETTERS if c != word[i].lower()]
        c = others[int(letter * len(others))]
        return word[:i] + (c.upper() if word[i].isupper() else c) + word[i + 1:]
    return word[:i] + word[i + 1:]


def _each_question(edit: Callable[[str, float, torch.Generator], str], questions: Sequence[str], severity: int,
                   generator: torch.Generator) -> list[str]:
    """``edit(question, rate, generator)`` on each question in turn; severity 0 changes nothing."""
    _check_questions(questions, severity)
    if severity == 0:
        return list(questions)
    rate = _WORD_RATE[severity]
    return [edit(q, rate, generator) for q in questions]


def _misspell(q: str, rate: float, generator: torch.Generator) -> str:
    words = list(_TYPO_WORD.finditer(q))
    # per word: hit, operation, position, letter
    draws = torch.rand((len(words), 4), generator=generator).tolist()  # (words, 4)
    pieces, end = [], 0
    for m, (hit, op, where, letter) in zip(words, draws, strict=True):
        pieces += [q[end:m.start()], _typo(m.group(), op, where, letter) if hit < rate else m.group()]
        end = m.end()
    return "".join(pieces) + q[end:]


def _drop_words(q: str, rate: float, generator: torch.Generator) -> str:
    words = q.split()
    draws = torch.rand(len(words), generator=generator).tolist()
    kept = [w for w, d in zip(words, draws, strict=True) if d >= rate]
    if words and not kept:  # the word least likely to go stays: it is kept at every lower severity too
        kept = [words[max(range(len(words)), key=draws.__getitem__)]]
    return q if len(kept) == len(words) else " ".join(kept)


def _swap_words(q: str, rate: float, generator: torch.Generator) -> str:
    words = q.split()
    draws = torch.rand(max(len(words) - 1, 0), generator=generator).tolist()
    i, swapped = 0, False
    while i < len(words) - 1:
        if draws[i] < rate:
            words[i], words[i + 1] = words[i + 1], words[i]
            swapped = True
            i += 2
        else:
            i += 1
    return " ".join(words) if swapped else q


def typos(questions: Sequence[str], severity: int, generator: torch.Generator) -> list[str]:
    """Misspell words (runs of >= 2 letters), each with chance 0.1 to 0.5: swap, replace or drop a letter."""
    return _each_question(_misspell, questions, severity, generator)


def word_drop(questions: Sequence[str], severity: int, generator: torch.Generator) -> list[str]:
    """Drop whitespace-separated words, each with chance 0.1 to 0.5; at least one word always stays."""
    return _each_question(_drop_words, questions, severity, generator)


def word_swap(questions: Sequence[str], severity: int, generator: torch.Generator) -> list[str]:
    """Swap neighbouring words: each pair with chance 0.1 to 0.5, left to right, no word moved twice."""
    return _each_question(_swap_words, questions, severity, generator)


@dataclass(frozen=True)
class Perturbation:
    """A named perturbation of one modality; call it as ``p(x, severity, generator)``."""

    name: str
    modality: Literal["image", "text"]
    fn: Callable[[Any, int, torch.Generator], Any]

    def __call__(self, x: Any, severity: int, generator: torch.Generator) -> Any:
        return self.fn(x, severity, generator)


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p for p in (
        Perturbation("gaussian_noise", "image", gaussian_noise),
        Perturbation("blur", "image", blur),
        Perturbation("contrast", "image", contrast),
        Perturbation("rotation", "image", rotation),
        Perturbation("occlusion", "image", occlusion),
        Perturbation("typos", "text", typos),
        Perturbation("word_drop", "text", word_drop),
        Perturbation("word_swap", "text", word_swap),
    )
}


def get_perturbation(p: str | Perturbation) -> Perturbation:
    if isinstance(p, Perturbation):
        return p
    if p not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {p!r}; choose one of {list(PERTURBATIONS)}")
    return PERTURBATIONS[p]
