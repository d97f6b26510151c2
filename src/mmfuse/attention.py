"""Multi-head scaled-dot-product attention: the one place where mmfuse computes attention.

Every layer projects its own queries, keys and values and then calls :func:`attend` (or owns an
:class:`Attention` module, which also holds the parameters some implementations need).

Shapes::

    B   batch               H   heads
    Nq  queries             Nk  keys / values
    D   head dimension

    q: (B, H, Nq, D)   k, v: (B, H, Nk, D)   key_padding_mask: (B, Nk) bool, True = keep
    out: (B, H, Nq, D) weights: (B, H, Nq, Nk), each row sums to 1 over its kept keys

A sample whose keys are all masked gets an output of zeros (and zero weights), never NaN, and its
gradients stay finite.

Implementations (``impl=``):

``auto``
    ``torch.nn.functional.scaled_dot_product_attention`` (the fused kernel) when no weights are asked
    for, else ``math``.
``math``
    Explicit ``softmax(q k^T / sqrt(D)) v``; the reference, and the only one that returns weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMPLS", "Attention", "attend", "check_key_padding_mask", "flops"]

# An implementation takes (q, k, v, keep, scale, dropout_p, **options) where `keep` is None or a
# (B, 1, 1, Nk) bool tensor with every sample keeping at least one key, and returns (out, weights|None).
AttentionFn = Callable[..., tuple[Tensor, "Tensor | None"]]
_REGISTRY: dict[str, AttentionFn] = {}


def _register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    def wrap(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        return fn

    return wrap


def check_key_padding_mask(mask: Tensor | None, batch: int, length: int, name: str = "mask") -> None:
    """Raise ``ValueError`` unless ``mask`` is None or a (batch, length) bool tensor."""
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = keep), got dtype {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (B, N) = ({batch}, {length}), got {tuple(mask.shape)}")


@_register("math")
def _math(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, dropout_p: float,
          need_weights: bool = True) -> tuple[Tensor, Tensor | None]:
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    # Softmax in float32: under bf16 autocast the row sums would otherwise drift.
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    probs = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(probs, v)  # (B, H, Nq, D)
    return out, (weights if need_weights else None)


@_register("auto")
def _auto(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, dropout_p: float,
          need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    if need_weights:
        return _math(q, k, v, keep, scale, dropout_p, need_weights=True)
    # 4-D q/k/v and a 4-D broadcastable bool mask reach the fused CPU (flash) kernel.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)
    return out, None


IMPLS: tuple[str, ...] = ("auto", "math")


def attend(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
           dropout_p: float = 0.0, need_weights: bool = False, impl: str = "auto",
           scale: float | None = None, **options) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention of ``q`` over ``k``/``v``; see the module docstring for shapes.

    ``dropout_p`` is applied to the attention probabilities as given: pass 0 outside training.
    ``options`` go to the chosen implementation (window sizes, projections...).
    """
    if impl not in _REGISTRY:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {sorted(_REGISTRY)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be 4-D (B, H, N, D), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, _, D = q.shape
    Nk = k.shape[2]
    if k.shape[:2] != (B, H) or k.shape[-1] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"k must be (B, H, Nk, D) = ({B}, {H}, Nk, {D}) and v (B, H, Nk, Dv), got "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    check_key_padding_mask(key_padding_mask, B, Nk, "key_padding_mask")
    scale = D**-0.5 if scale is None else scale

    keep = None
    empty = None  # (B, 1, 1, 1) True where a sample has no key at all
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
        has_key = key_padding_mask.any(dim=-1)
        if not bool(has_key.all()):
            # Let empty samples attend everywhere (no -inf rows, no NaN), then zero their outputs.
            empty = ~has_key[:, None, None, None]
            keep = keep | empty
    out, weights = _REGISTRY[impl](q, k, v, keep, scale, dropout_p, need_weights=need_weights, **options)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
        if weights is not None:
            weights = weights.masked_fill(empty, 0.0)
    return out, weights


class Attention(nn.Module):
    """The attention step of a layer: implementation choice, dropout, and impl-specific parameters.

    It has no q/k/v projections; layers own those and call this module on (B, H, N, D) tensors.
    """

    def __init__(self, *, impl: str = "auto", dropout: float = 0.0) -> None:
        super().__init__()
        if impl not in _REGISTRY:
            raise ValueError(f"unknown attention impl {impl!r}; choose one of {sorted(_REGISTRY)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.impl = impl
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        return attend(q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights,
                      impl=self.impl, dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, dropout={self.dropout}"


def flops(batch: int, heads: int, nq: int, nk: int, head_dim: int) -> int:
    """Forward FLOPs of attention (two matmuls, multiply-add counted as 2)."""
    return 4 * batch * heads * nq * nk * head_dim

