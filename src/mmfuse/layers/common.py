"""Small pieces shared by the fusion layers: shape checks, masks, masked mean pooling, the MLP.

Shapes::

    B  batch   N  tokens   C  channels
    x: (B, N, C)   mask: (B, N) bool, True = keep
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.attention import check_key_padding_mask

__all__ = [
    "FeedForward",
    "check_context_index",
    "check_mask",
    "check_tokens",
    "concat_masks",
    "context_slots",
    "gather_rows",
    "init_linear",
    "masked_mean",
    "take_rows",
    "trust_inputs",
    "zero_padding",
]


def check_tokens(x: Tensor, dim: int, name: str, *, batch: int | None = None, seq: str = "N") -> None:
    """Raise ``ValueError`` unless ``x`` is (B, N, dim), with B == ``batch`` when given.

    The message names the expected and the received shape, e.g.
    ``context must have shape (B, Nk, 64), got (2, 5, 32)``.
    """
    if x.dim() != 3 or x.shape[-1] != dim or (batch is not None and x.shape[0] != batch):
        expected = f"({'B' if batch is None else batch}, {seq}, {dim})"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def check_mask(mask: Tensor | None, x: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``mask`` is None or a (B, N) bool mask for the tokens ``x``."""
    check_key_padding_mask(mask, x.shape[0], x.shape[1], name)


def check_context_index(index: Tensor, batch: int, num_contexts: int) -> None:
    """Raise ``ValueError`` unless ``index`` is an int64 (batch,) tensor of rows in [0, num_contexts).

    Reading the range back makes the host wait for the device once, so models and fusions call this at
    their entry only, never in a block.
    """
    if index.dtype != torch.long or tuple(index.shape) != (batch,):
        raise ValueError(f"context_index must be int64 of shape ({batch},), got {index.dtype} {tuple(index.shape)}")
    if batch and bool(((index < 0) | (index >= num_contexts)).any()):  # one read-back, not two
        raise ValueError(f"context_index values must be in [0, {num_contexts}), got "
                         f"[{int(index.min())}, {int(index.max())}]")


def trust_inputs(*modules: nn.Module) -> None:
    """Switch off the input checks of ``modules`` and of every layer inside them.

    A layer checks the shapes of what it is given (``validate_inputs``, True by default) so that a
    mistake names the shapes, and replaces padded tokens by zeros (:func:`zero_padding`) so that what
    they hold never matters. Inside a fusion or a stack the owner has checked the inputs once at its
    entry, and its blocks build each other's inputs, so checking again in every block only costs time.
    """
    for module in modules:
        for m in module.modules():
            if hasattr(m, "validate_inputs"):
                m.validate_inputs = False


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0, (I, ...) -> (B, ...), for float tensors as a one-hot matmul.

    The gradient of an index gather is a scatter-add, which runs serially on CPU; as a matmul both
    directions are one BLAS call (a few ms less per VQA training step). Exact in the forward pass:
    each output row is one input row times 1 plus zeros.
    """
    if not x.is_floating_point() or x.shape[0] > 4096:
        return x.index_select(0, index)
    # A comparison, not F.one_hot, which reads the index range back to the host on every call; the
    # range is checked once where the index enters (check_context_index).
    one_hot = (index[:, None] == torch.arange(x.shape[0], device=index.device)).to(x.dtype)  # (B, I)
    return (one_hot @ x.reshape(x.shape[0], -1)).reshape(index.shape[0], *x.shape[1:])


def context_slots(index: Tensor, num_contexts: int, *, max_padding: float = 2.0) -> tuple[Tensor, int] | None:
    """Slots that lay rows out by their context: row b goes to ``index[b] * per + (its rank among the rows
    of context index[b])`` of an (num_contexts * per) layout, ``per`` the most rows any context has.

    Then each context's keys serve all of its rows in one matrix product (``(I, per, ...) @ (I, ...)``),
    where gathering them copies them once per row. None where that is not worth it or cannot be done:
    a layout more than ``max_padding`` times the rows, no rows, a tensor off the CPU (reading ``per`` would
    make the host wait for the device), a trace or ``torch.compile`` (``per`` is read from the data).
    """
    if (index.device.type != "cpu" or index.numel() == 0 or torch.jit.is_tracing()
            or torch.compiler.is_compiling()):
        return None
    counts = torch.bincount(index, minlength=num_contexts)  # (I,)
    per = int(counts.max())
    if num_contexts * per > max_padding * index.numel():
        return None
    order = torch.argsort(index, stable=True)
    first = counts.cumsum(0) - counts  # (I,) the first sorted position of each context's rows
    sorted_rank = torch.arange(index.numel(), device=index.device) - first[index[order]]
    rank = sorted_rank[torch.argsort(order)]  # back to the rows' order
    return index * per + rank, per


def to_slots(x: Tensor, slots: Tensor, size: int) -> Tensor:
    """Rows of ``x`` (B, ...) placed at ``slots`` of a zero (size, ...) tensor; the inverse of :func:`take_rows`.
    Its gradient is a selection (each slot holds one row), so no scatter-add."""
    return x.new_zeros(size, *x.shape[1:]).index_copy(0, slots, x)


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x[rows]`` along dim 0 for *distinct* ``rows``, with a gradient that copies instead of adding.

    The gradient of an index gather is a scatter-add; with distinct rows every row receives one
    gradient row, which ``index_copy`` places with no accumulation at all.
    """
    if not (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing():
        return x.index_select(0, rows)
    return _TakeRows.apply(x, rows)


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.num_rows, *grad.shape[1:]).index_copy_(0, rows, grad), None


def concat_masks(masks: list[Tensor | None], tokens: list[Tensor]) -> Tensor | None:
    """The key-padding mask of ``torch.cat(tokens, dim=1)``; a missing mask keeps every token."""
    if all(m is None for m in masks):
        return None
    return torch.cat(
        [torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
         for m, t in zip(masks, tokens, strict=True)],
        dim=1,
    )  # (B, sum N)


def zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` (B, N, C) with its padded tokens (``mask`` False) replaced by zeros; unchanged without a mask.

    A selection, not a product: NaN or Inf at a padded position vanish (0 * NaN is NaN), and so does
    their influence on every gradient, parameters' included. Layers apply it where tokens enter.
    """
    return x if mask is None else torch.where(mask[..., None], x, 0.0)


def masked_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of the kept tokens: (B, N, C) -> (B, C).

    A sample with no kept token, or a sequence of no token at all (N = 0), gets zeros with finite
    gradients. Padded tokens are selected away, so whatever they hold (NaN, Inf) does not matter.
    """
    if mask is None:
        # N = 0 is a shape, known on the host: an empty sum (zeros), not 0 / 0.
        return x.mean(dim=1) if x.shape[1] else x.sum(dim=1)
    count = mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)  # (B, 1); 1 for an all-masked sample
    return zero_padding(x, mask).sum(dim=1) / count


def init_linear(linear: nn.Linear) -> None:
    """Xavier-uniform weight, zero bias: the initialisation of every projection in mmfuse.layers."""
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Dropout -> Linear -> Dropout.

    ``(..., dim) -> (..., out_dim or dim)`` with ``int(dim * mlp_ratio)`` hidden units.
    """

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0, out_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"dim * mlp_ratio must be >= 1, got dim={dim}, mlp_ratio={mlp_ratio}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self) -> None:
        init_linear(self.fc1)
        init_linear(self.fc2)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
