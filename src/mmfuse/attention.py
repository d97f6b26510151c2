"""Multi-head scaled-dot-product attention: the one place where mmfuse computes attention.

Every layer projects its own queries, keys and values and then calls :func:`attend` (or owns an
:class:`Attention` module, which also holds the parameters some implementations need).

Shapes::

    B   batch               H   heads
    Nq  queries             Nk  keys / values
    D   head dimension

    q: (B, H, Nq, D)   k, v: (B, H, Nk, D)   key_padding_mask: (B, Nk) bool, True = keep
    out: (B, H, Nq, D) weights: (B, H, Nq, Nk), each row sums to 1 over its kept keys

Masked keys and values never matter: whatever they hold (NaN and Inf included), the output and the
gradients equal those with zeros there, because :func:`attend` replaces them by zeros (a selection,
not a product) before any implementation sees them. A sample whose keys are all masked gets an
output of zeros (and zero weights), never NaN, and its gradients stay finite; so does a call with no
keys at all (Nk = 0), and a batch of 0 samples gives an empty output. None of this tests the mask's
values on the host: no call makes the host wait for the device.

Layers take the implementation as ``impl=``: a name below, or an :class:`AttentionConfig` holding the
name and its options, which a model passes unchanged to every layer it builds.

``causal=True`` (every implementation but ``lowrank``) lets query i see only keys
``j <= i + Nk - Nq``: the usual causal mask when Nq == Nk, and, when a decoder feeds only its newest
Nq tokens against a :class:`KVCache` of all Nk, the same rows of that mask (bottom-right aligned). A
query row that sees no kept key gets zeros, like an empty sample.

Implementations (``impl=``) and their options:

``auto``
    ``torch.nn.functional.scaled_dot_product_attention`` (the fused kernel), except that it runs
    ``math`` when weights are asked for, and for fp32/fp64 on CPU when each (batch, head) has at most
    ``SMALL_SCORES`` = 64 x 64 scores, where the explicit path is faster.
``math``
    Explicit ``softmax(q k^T / sqrt(D)) v``; the reference, and the path that returns weights (``auto``
    returns them by running it).
``chunked`` (``block_q=512, block_k=1024``)
    Exact attention in query/key tiles with an online softmax; backward recomputes the tiles
    (flash-attention style), so no Nq x Nk tensor exists in forward or backward. Weights: no.
``local`` (``window``, ``num_global=0``, ``block_q=256, block_k=1024``)
    Sliding window of ``window`` keys around each query's centre key plus ``num_global`` global
    tokens, computed tile by tile on the band only, so cost grows linearly with the length. The exact
    pattern, including the centre of query i when Nq != Nk (``round(i (Nk-1) / (Nq-1))``), is
    :func:`local_attention_mask`. Rows whose visible keys are all padding give zeros. Weights: no.
``lowrank`` (``proj_k``, ``proj_v``: (rank, max_len) tensors)
    Linformer: keys and values are projected along the sequence to ``rank`` rows by the first Nk
    columns of ``proj_k`` / ``proj_v`` (padded keys zeroed first), then attended with ``auto``.
    :class:`Attention` owns the projections, built from an :class:`AttentionConfig`'s ``rank`` and
    ``max_len`` (filled in by :meth:`AttentionConfig.for_keys`). Weights: no (they would be over the
    ``rank`` projected rows, not over keys).

When each wins, measured on the 2-core AVX2 development machine (two threads, fp32 unless said, Nq = Nk
= N, 8 heads of 64; ``benchmarks/README.md`` has the tables and the command):

* ``auto`` is the fastest exact choice. At N = 4096 the fused kernel runs the forward 3.5x and
  forward+backward 2.2x-2.7x faster than naive matmul-softmax-matmul (the forward at 77% of the
  machine's fp32 matmul rate), and its memory is linear in N (322 MiB for forward+backward at
  N = 32768). At fusion shapes (16 queries, 64 keys) ``auto`` runs ``math``, forward+backward 1.8x
  faster than the fused kernel there: see ``SMALL_SCORES`` below.
* ``math``: when the weights are wanted. Its memory is quadratic: 6 GiB at N = 8192.
* ``chunked`` is exact with linear memory too (420 MiB at N = 32768) but in fp32 about 1.5x slower
  than the fused kernel. It wins for bf16 on CPUs without bf16 units: forward+backward at N = 4096
  took 1.7 s against ``auto``'s 5.3 s, whose fused backward runs bf16 matmuls. Its many small ops
  make it the most sensitive to a busy machine when it runs on several threads.
* ``local`` (window 256, 16 global tokens) ran forward+backward at N = 4096 3.7x faster than ``auto``;
  time and memory are linear in N (4 s and 329 MiB at N = 32768).
* ``lowrank`` (rank 256) was 10x faster than ``auto`` at N = 4096: an approximation with learned
  projections and a fixed ``max_len``, for long inputs of bounded length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfuse._attention_blocked import block_attention, causal_plan, dense_plan, local_attention_mask, local_plan
from mmfuse.device import cpu_bf16_support

__all__ = [
    "IMPLS",
    "SMALL_SCORES",
    "Attention",
    "AttentionConfig",
    "KVCache",
    "attend",
    "causal_mask",
    "check_key_padding_mask",
    "flops",
    "local_attention_mask",
]

# An implementation takes (q, k, v, keep, scale, dropout_p, **options) where `keep` is None or a
# (B, 1, 1, Nk) bool tensor with every sample keeping at least one key, and returns (out, weights|None).
AttentionFn = Callable[..., tuple[Tensor, "Tensor | None"]]
_REGISTRY: dict[str, AttentionFn] = {}
# Keyword options each implementation accepts from attend(**options).
_OPTIONS: dict[str, tuple[str, ...]] = {}


def _register(name: str, options: tuple[str, ...] = ()) -> Callable[[AttentionFn], AttentionFn]:
    def wrap(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        _OPTIONS[name] = options
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


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_window(window: int | None) -> int:
    if window is None:
        raise ValueError("impl='local' needs window= (the number of keys each query sees)")
    return _check_int("window", window, 1)


def _no_weights(impl: str, need_weights: bool) -> None:
    if need_weights:
        raise ValueError(f"impl={impl!r} does not return attention weights; use impl='math' (or 'auto')")


# On CPU, up to this many scores per (batch, head) the explicit path is faster than the fused kernel,
# which pays a fixed cost per tile (2-core AVX2 machine, fp32, B = 64: 16 x 64 scores with 8 heads of 32,
# forward+backward 9.0 ms against 14.9 ms, forward 2.7 ms against 3.5 ms; 11 x 64 with 4 heads of 16,
# forward 0.5 ms against 1.5 ms; from 128 x 128 on the fused kernel wins). Such score tensors are small.
SMALL_SCORES = 64 * 64


def explicit_on_cpu(dtype: torch.dtype, device: torch.device, nq: int, nk: int) -> bool:
    """Whether ``impl="auto"`` runs the explicit path for (B, H, nq, D) queries over nk keys.

    On CPU at most ``SMALL_SCORES`` scores per (batch, head), in fp32/fp64, or in bf16 where the CPU has
    bf16 units: without them explicit bf16 matmuls are emulated (10x slower at the fusion shape), while
    with them the fused kernel was the slow one (2-core AVX512-BF16 machine, the default VQA model's
    cross-attention in bf16, forward+backward: 63 ms fused against 10.5 ms explicit).
    """
    if device.type != "cpu" or nq * nk > SMALL_SCORES:
        return False
    return dtype in (torch.float32, torch.float64) or (dtype == torch.bfloat16 and cpu_bf16_support() != "none")


def _small_on_cpu(q: Tensor, k: Tensor) -> bool:
    return explicit_on_cpu(q.dtype, q.device, q.shape[2], k.shape[2])


def causal_mask(nq: int, nk: int, device: torch.device | str | None = None) -> Tensor:
    """The (Nq, Nk) bool mask of ``causal=True`` (True = attend): query i sees keys ``j <= i + Nk - Nq``."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril(diagonal=nk - nq)


def _with_causal(keep: Tensor | None, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``keep`` and the causal mask combined, (B|1, 1, Nq, Nk), rows without a key opened up; and those rows
    (B|1, 1, Nq, 1), whose outputs the caller zeroes (a softmax over no key would be NaN)."""
    allowed = causal_mask(q.shape[2], k.shape[2], q.device)  # (Nq, Nk)
    keep = allowed[None, None] if keep is None else keep & allowed  # (B|1, 1, Nq, Nk)
    row_empty = ~keep.any(dim=-1, keepdim=True)
    return keep | row_empty, row_empty


@_register("auto")
def _auto(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, dropout_p: float,
          need_weights: bool = False, causal: bool = False) -> tuple[Tensor, Tensor | None]:
    if need_weights or _small_on_cpu(q, k):
        return _math(q, k, v, keep, scale, dropout_p, need_weights=need_weights, causal=causal)
    if causal and keep is None and q.shape[2] == k.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale, is_causal=True)
        return out, None
    row_empty = None
    if causal:  # with padding, or aligned bottom-right (is_causal aligns top-left): an explicit mask
        keep, row_empty = _with_causal(keep, q, k)
    # 4-D q/k/v and a 4-D broadcastable bool mask reach the fused CPU (flash) kernel.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)
    return (out if row_empty is None else out.masked_fill(row_empty, 0.0)), None


@_register("math")
def _math(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, dropout_p: float,
          need_weights: bool = True, causal: bool = False) -> tuple[Tensor, Tensor | None]:
    row_empty = None
    if causal:
        keep, row_empty = _with_causal(keep, q, k)  # (B|1, 1, Nq, Nk)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, H, Nq, Nk)
    if keep is not None:
        # Adding a (B, 1, 1, Nk) bias of 0 / -inf in place costs less than a masked_fill copy of the scores.
        scores.add_(torch.zeros(keep.shape, dtype=scores.dtype, device=scores.device).masked_fill_(~keep, -math.inf))
    # Softmax in at least float32: under bf16 autocast the row sums would otherwise drift. (Asking fp32 of an
    # fp32 softmax still copies the scores: one op more per call, which cached decoding pays at every step.)
    if scores.dtype in (torch.float32, torch.float64):
        weights = scores.softmax(dim=-1)
    else:
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    probs = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(probs, v)  # (B, H, Nq, D)
    if row_empty is not None:
        out = out.masked_fill(row_empty, 0.0)
        weights = weights.masked_fill(row_empty, 0.0)
    return out, (weights if need_weights else None)


@_register("chunked", ("block_q", "block_k"))
def _chunked(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, dropout_p: float,
             need_weights: bool = False, block_q: int = 512, block_k: int = 1024,
             causal: bool = False) -> tuple[Tensor, None]:
    _no_weights("chunked", need_weights)
    plan = dense_plan(q.shape[2], k.shape[2], _check_int("block_q", block_q, 1), _check_int("block_k", block_k, 1))
    if causal:
        plan = causal_plan(plan, q.shape[2], k.shape[2], device=q.device)
    return block_attention(q, k, v, keep, scale, dropout_p, plan), None


@_register("local", ("window", "num_global", "block_q", "block_k"))
def _local(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, dropout_p: float,
           need_weights: bool = False, window: int | None = None, num_global: int = 0, block_q: int = 256,
           block_k: int = 1024, causal: bool = False) -> tuple[Tensor, None]:
    _no_weights("local", need_weights)
    window = _check_window(window)
    plan = local_plan(q.shape[2], k.shape[2], window=window,
                      num_global=_check_int("num_global", num_global, 0),
                      block_q=_check_int("block_q", block_q, 1), block_k=_check_int("block_k", block_k, 1),
                      device=q.device)
    if causal:
        plan = causal_plan(plan, q.shape[2], k.shape[2], device=q.device)
    return block_attention(q, k, v, keep, scale, dropout_p, plan, window), None


@_register("lowrank", ("proj_k", "proj_v"))
def _lowrank(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, dropout_p: float,
             need_weights: bool = False, proj_k: Tensor | None = None,
             proj_v: Tensor | None = None, causal: bool = False) -> tuple[Tensor, None]:
    _no_weights("lowrank", need_weights)
    if causal:
        raise ValueError("impl='lowrank' cannot be causal: its projections mix every position into each row")
    if proj_k is None or proj_v is None:
        raise ValueError("impl='lowrank' needs proj_k= and proj_v= (rank, max_len) tensors; "
                         "Attention(impl='lowrank', rank=..., max_len=...) holds them")
    Nk = k.shape[2]
    if proj_k.dim() != 2 or proj_k.shape != proj_v.shape:
        raise ValueError(f"proj_k and proj_v must both be (rank, max_len), got {tuple(proj_k.shape)} "
                         f"and {tuple(proj_v.shape)}")
    if Nk > proj_k.shape[1]:
        raise ValueError(f"impl='lowrank' was built for at most max_len={proj_k.shape[1]} keys, got Nk={Nk}")
    proj_k, proj_v = proj_k[:, :Nk].to(k.dtype), proj_v[:, :Nk].to(v.dtype)  # (rank, Nk)
    if keep is not None:
        # Zero columns for padded keys: they add nothing to the projected rows and get no gradient.
        proj_k, proj_v = proj_k.masked_fill(~keep, 0.0), proj_v.masked_fill(~keep, 0.0)  # (B, 1, rank, Nk)
    k = torch.matmul(proj_k, k)  # (B, H, rank, D)
    v = torch.matmul(proj_v, v)  # (B, H, rank, Dv)
    return _auto(q, k, v, None, scale, dropout_p)


IMPLS: tuple[str, ...] = tuple(_REGISTRY)


def _select(x: Tensor, keep: Tensor) -> Tensor:
    # torch.where with the mask expanded to x's shape ran about 2x faster than masked_fill with the
    # broadcast mask on CPU (both are scalar kernels there).
    return torch.where(keep.expand(x.shape), x, 0.0)


def _zero_padded(k: Tensor, v: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """``(k, v)`` with padded keys and values replaced by zeros; ``keep`` (B, 1, Nk, 1) bool."""
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad) and not torch.jit.is_tracing():
        return _ZeroPadded.apply(k, v, keep)
    # Nothing to differentiate, or a TorchScript trace (which cannot record a Python autograd.Function).
    return _select(k, keep), _select(v, keep)


class _ZeroPadded(torch.autograd.Function):
    """``(k, v)`` with padded keys and values replaced by zeros; ``keep`` (B, 1, Nk, 1) bool.

    The forward pass selects (``torch.where``), since padded values may be NaN. The backward pass
    hands the gradients through unchanged: every implementation gives padded keys and values an
    exactly zero gradient already (their probabilities are exactly 0, ``lowrank`` projects them with
    zero columns, an empty sample's output gradient is zeroed by ``attend``), which
    ``tests/test_properties.py`` checks for every registered implementation. Selecting again there
    would be the textbook derivative, but selections are scalar kernels on CPU: with masked_fill's
    own backward, ``attend`` forward+backward at the fusion shape (B=64, H=8, Nq=16, Nk=64, D=32,
    padded) took 1.8x as long as without any selection on the 2-core development machine; with
    this pass-through, 1.2x.
    """

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        return _select(k, keep), _select(v, keep)

    @staticmethod
    def backward(ctx, dk: Tensor | None, dv: Tensor | None) -> tuple[Tensor | None, Tensor | None, None]:
        return dk, dv, None


def attend(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
           dropout_p: float = 0.0, need_weights: bool = False, impl: str = "auto",
           scale: float | None = None, causal: bool = False, padding_zeroed: bool = False,
           **options) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention of ``q`` over ``k``/``v``; see the module docstring for shapes.

    ``causal``: query i sees keys ``j <= i + Nk - Nq`` only (see the module docstring).

    ``padding_zeroed``: ``k`` and ``v`` already hold zeros at the padded keys (a static :class:`KVCache`
    zeroes them once when it is filled), so the selection that replaces them is skipped.

    ``dropout_p`` is applied to the attention probabilities as given: pass 0 outside training.
    ``options`` go to the chosen implementation (window sizes, projections...).
    """
    if impl not in _REGISTRY:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {sorted(_REGISTRY)}")
    unknown = sorted(set(options) - set(_OPTIONS[impl]))
    if unknown:
        raise ValueError(f"impl={impl!r} takes no option(s) {unknown}; it takes {list(_OPTIONS[impl])}")
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
        # Padded keys and values become zeros by selection, once, here: whatever they held (NaN, Inf)
        # then reaches no score and no sum, and every implementation may keep masking by arithmetic
        # (a -inf bias, a 0 weight), which is exact on finite values but not on NaN (0 * NaN = NaN).
        if not padding_zeroed:
            k, v = _zero_padded(k, v, key_padding_mask[:, None, :, None])
        # Empty samples attend everywhere (no -inf rows, no NaN) and get their outputs zeroed after.
        # Done for every masked call rather than after testing whether any sample is empty: reading
        # that answer back would make the host wait for the device on every call.
        empty = ~key_padding_mask.any(dim=-1)[:, None, None, None]
        keep = key_padding_mask[:, None, None, :] | empty  # (B, 1, 1, Nk)
    # One query after all of its keys (cached decoding) sees every key: causal is then a no-op.
    causal = causal and not (q.shape[2] == 1 and impl != "lowrank")
    if causal:
        options["causal"] = True
    out, weights = _REGISTRY[impl](q, k, v, keep, scale, dropout_p, need_weights=need_weights, **options)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
        if weights is not None:
            weights = weights.masked_fill(empty, 0.0)
    return out, weights


def _module_options(impl: str) -> tuple[str, ...]:
    """The options a configuration may set: attend's, except that lowrank's projections are built from these."""
    return ("rank", "max_len") if impl == "lowrank" else _OPTIONS[impl]


@dataclass(frozen=True)
class AttentionConfig:
    """Which attention implementation a layer runs, with its options: one value for a whole model.

    Every layer, fusion, encoder and model that takes ``impl=`` accepts either an implementation name
    (``"chunked"``, shorthand for ``AttentionConfig("chunked")``) or an ``AttentionConfig``. Options
    left at None take the implementation's defaults (see the module docstring); setting one that the
    implementation does not use is an error, as is ``local`` without ``window`` or ``lowrank`` without
    ``rank``.

    ``max_len`` is the longest key sequence ``lowrank``'s projections cover. Models and fusions fill
    it in from the sequences they attend over (:meth:`for_keys`), so a user rarely sets it.
    """

    impl: str = "auto"
    window: int | None = None
    num_global: int | None = None
    block_q: int | None = None
    block_k: int | None = None
    rank: int | None = None
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.impl not in _REGISTRY:
            raise ValueError(f"unknown attention impl {self.impl!r}; choose one of {sorted(_REGISTRY)}")
        for name, value in self._given().items():
            if name not in _module_options(self.impl):
                users = [other for other in _REGISTRY if name in _module_options(other)]
                raise ValueError(f"{name}= applies to impl in {users}, not impl={self.impl!r}")
            _check_int(name, value, 0 if name == "num_global" else 1)
        if self.impl == "local":
            _check_window(self.window)
        if self.impl == "lowrank" and self.rank is None:
            raise ValueError("impl='lowrank' needs rank= (the number of rows keys and values are projected to)")

    def _given(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "impl" and getattr(self, f.name) is not None}

    @classmethod
    def coerce(cls, impl: str | AttentionConfig) -> AttentionConfig:
        """``impl`` as a configuration: a name becomes ``AttentionConfig(impl)``, a configuration stays."""
        if isinstance(impl, AttentionConfig):
            return impl
        if isinstance(impl, str):
            return cls(impl)
        raise TypeError(f"impl must be an implementation name or an AttentionConfig, got {type(impl).__name__}")

    @property
    def options(self) -> dict[str, int]:
        """The keyword options :func:`attend` takes for this implementation (lowrank's come as projections)."""
        return {name: value for name, value in self._given().items() if name in _OPTIONS[self.impl]}

    @property
    def returns_weights(self) -> bool:
        """Whether this implementation can return attention weights (``need_weights=True``)."""
        return self.impl in ("auto", "math")

    def for_keys(self, length: int) -> AttentionConfig:
        """This configuration for a layer whose keys are at most ``length`` long: fills in lowrank's
        ``max_len`` when it is not set; other implementations do not depend on the length."""
        if self.impl == "lowrank" and self.max_len is None:
            return replace(self, max_len=length)
        return self

    def to_dict(self) -> dict[str, Any]:
        """``{"impl": ..., **options that are set}``, for JSON."""
        return {"impl": self.impl, **self._given()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown attention option(s) {unknown}; expected {[f.name for f in fields(cls)]}")
        return cls(**d)

    def __str__(self) -> str:
        return ", ".join(f"{k}={v!r}" if k == "impl" else f"{k}={v}" for k, v in self.to_dict().items())


class Attention(nn.Module):
    """The attention step of a layer: implementation choice, dropout, and impl-specific parameters.

    It has no q/k/v projections; layers own those and call this module on (B, H, N, D) tensors.
    ``impl`` is a name or an :class:`AttentionConfig`; keyword options (``window``, ``num_global``,
    ``block_q``, ``block_k``, ``rank``, ``max_len``) override the configuration's. With ``lowrank``
    the module owns the sequence projections ``proj_k``, ``proj_v`` of shape (rank, max_len), so
    ``max_len`` must be known here.
    """

    def __init__(self, *, impl: str | AttentionConfig = "auto", dropout: float = 0.0, **options: int | None) -> None:
        super().__init__()
        given = {name: value for name, value in options.items() if value is not None}
        unknown = sorted(set(given) - {f.name for f in fields(AttentionConfig)})
        if unknown:
            raise ValueError(f"unknown attention option(s) {unknown}")
        if isinstance(impl, str):
            config = AttentionConfig(impl, **given)
        else:
            config = replace(AttentionConfig.coerce(impl), **given)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = config
        self.impl = config.impl
        self.dropout = dropout
        self.options = config.options  # for attend()
        self.proj_k: nn.Parameter | None = None
        self.proj_v: nn.Parameter | None = None
        if config.impl == "lowrank":
            if config.max_len is None:
                raise ValueError("impl='lowrank' needs rank= and max_len= (the longest key sequence; models and "
                                 "fusions fill it in with AttentionConfig.for_keys)")
            self.proj_k = nn.Parameter(torch.empty(config.rank, config.max_len))
            self.proj_v = nn.Parameter(torch.empty(config.rank, config.max_len))
            self.init_weights()

    def init_weights(self) -> None:
        if self.proj_k is not None and self.proj_v is not None:
            # std 1/sqrt(max_len): a projected row of a full-length input keeps the scale of one key.
            std = 1.0 / math.sqrt(self.proj_k.shape[1])
            nn.init.normal_(self.proj_k, std=std)
            nn.init.normal_(self.proj_v, std=std)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, causal: bool = False,
                padding_zeroed: bool = False) -> tuple[Tensor, Tensor | None]:
        options = dict(self.options)
        if self.proj_k is not None:
            options.update(proj_k=self.proj_k, proj_v=self.proj_v)
        return attend(q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights, causal=causal,
                      impl=self.impl, dropout_p=self.dropout if self.training else 0.0,
                      padding_zeroed=padding_zeroed, **options)

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={value}" for name, value in self.options.items())
        if self.proj_k is not None:
            extra += f", rank={self.proj_k.shape[0]}, max_len={self.proj_k.shape[1]}"
        return f"impl={self.impl!r}, dropout={self.dropout}{extra}"


class KVCache:
    """The keys and values one attention layer has seen while decoding, (B, H, N, D) each.

    ``update(k, v)`` appends the new tokens' keys and values and returns all of them. A ``static`` cache
    (cross-attention over a fixed context) is filled once; later calls reuse it (``full``) and skip the
    context's projections. Given the context's ``key_padding_mask`` (B, N), a static cache stores zeros at
    the padded keys, so that :func:`attend` need not select them away again at every step
    (``padding_zeroed=True``). ``reorder(index)`` keeps rows ``index`` (beam search).

    A growing cache writes into a preallocated buffer of ``capacity`` positions (doubled when a sequence
    outgrows it; a decoder passes its ``max_length``) and returns views of its first N positions, so a step
    copies only its own new keys and values, not the whole cache as a ``torch.cat`` would. With autograd
    recording (keys that require grad) it concatenates instead: an in-place write would invalidate the
    views earlier steps saved for backward.
    """

    def __init__(self, *, static: bool = False, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 (positions), got {capacity}")
        self.static = static
        self.capacity = capacity
        self._k: Tensor | None = None  # (B, H, capacity, D) buffers; positions >= length are unused
        self._v: Tensor | None = None
        self.length = 0

    @property
    def k(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]  # (B, H, N, D)

    @property
    def v(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    @property
    def full(self) -> bool:
        """Whether a static cache already holds its context."""
        return self.static and self._k is not None

    def __len__(self) -> int:
        return self.length

    def update(self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n = k.shape[2]
        if key_padding_mask is not None:
            if not self.static:
                raise ValueError("a growing KVCache takes no key_padding_mask (it would have to cover the cached keys)")
            k, v = _zero_padded(k, v, key_padding_mask[:, None, :, None])
        if self.static or self._k is None or self._v is None:
            if self.static or k.requires_grad or v.requires_grad:
                # contiguous (B, H, N, D): each step's q k^T then reads the cache in place, where a transposed
                # projection would be copied whole by every matmul
                self._k, self._v = k.contiguous(), v.contiguous()
            else:
                self._k, self._v = self._allocate(k, n), self._allocate(v, n)
                self._k[:, :, :n], self._v[:, :, :n] = k, v
            self.length = n
            return self.k, self.v
        end = self.length + n
        if k.requires_grad or v.requires_grad or self._k.requires_grad:
            self._k, self._v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # (B, H, N + n, D)
        else:
            if end > self._k.shape[2]:
                self._k, self._v = self._grow(self._k, end), self._grow(self._v, end)
            self._k[:, :, self.length:end], self._v[:, :, self.length:end] = k, v
        self.length = end
        return self.k, self.v

    def _allocate(self, x: Tensor, n: int) -> Tensor:
        B, H, _, D = x.shape
        positions = max(n, self.capacity or 0, 16)
        return x.new_empty(B, H, positions, D)

    def _grow(self, buffer: Tensor, needed: int) -> Tensor:
        bigger = self._allocate(buffer, max(needed, 2 * buffer.shape[2]))
        bigger[:, :, :self.length] = buffer[:, :, :self.length]
        return bigger

    def reorder(self, index: Tensor) -> None:
        if self._k is not None and self._v is not None:
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)


def flops(batch: int, heads: int, nq: int, nk: int, head_dim: int) -> int:
    """Forward FLOPs of attention (two matmuls, multiply-add counted as 2)."""
    return 4 * batch * heads * nq * nk * head_dim
