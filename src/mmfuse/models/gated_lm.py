"""Flamingo-style decoding: a frozen local Hugging Face causal language model (GPT-2 style) whose layers are
interleaved with gated cross-attention over the image (and question) tokens.

Shapes::

    B  sequences    T  tokens    N  context tokens    V  the LM's vocabulary    D  the LM's width
    C  the context's width

    ids: (B, T) int64, ``<bos>`` first       context: (B, N, C)    context_mask: (B, N) bool, True = keep
    logits: (B, T, V), position t predicts token t + 1      weights: (B, T, N)

After every ``every``-th layer of the LM (layers ``every - 1``, ``2 * every - 1``, ...) a
:class:`~mmfuse.layers.GatedCrossAttention` block adds ``tanh(gate) * cross_attention(...)`` and a gated
feed-forward to the hidden states. The gates start at zero, so at initialisation the model computes exactly
the LM's own logits; training moves only the gates and the blocks (the LM is frozen and stays in eval mode,
its gradients still flow through it to the blocks below). The blocks are attached with forward hooks on the
LM's layers, so the LM runs through its own ``forward`` (its positions, masks and ``past_key_values``) in
every version of ``transformers`` that has the model. The hooks read the context of the call in progress
from the module, so one instance runs one forward at a time (``mmfuse serve`` runs the model on one worker
thread).

The LM's weights stay in its folder and are not part of the state: a fingerprint of the folder takes their
place (:func:`mmfuse.encoders.hf.freeze_backbone`), so a checkpoint stores the blocks only and refuses a folder
that holds other weights. Its tokenizer is saved with the checkpoint (:class:`LMTokenizer`).

Decoding keeps the LM's own key/value cache (``past_key_values``) and a static
:class:`~mmfuse.attention.KVCache` per block for the projected context: :class:`LMCache`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmfuse.attention import AttentionConfig, KVCache
from mmfuse.encoders.hf import freeze_backbone, resolve_hf_path
from mmfuse.encoders.tokenizer import decoder_rows
from mmfuse.layers import GatedCrossAttention
from mmfuse.layers.common import trust_inputs

__all__ = ["GatedLM", "LMCache", "LMTokenizer", "lm_vocab_size"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError("a Hugging Face language model (--lm hf:PATH) needs the 'transformers' package: "
                          "pip install 'mmfuse[hf]'") from e
    return transformers


def lm_vocab_size(path: str | os.PathLike) -> int:
    """The size of the LM's output layer (its config's ``vocab_size``), read without loading the weights."""
    folder = resolve_hf_path(path)
    return int(_transformers().AutoConfig.from_pretrained(folder, local_files_only=True).vocab_size)


class LMTokenizer:
    """The LM's own Hugging Face tokenizer in the caption tokenizer's interface.

    ``encode`` gives ``<bos> tokens <eos>`` rows, padded with ``<eos>`` (GPT-2 has no pad token; the caption
    task scores each row up to its first ``<eos>``); ``<bos>`` is the tokenizer's, else its ``<eos>`` (GPT-2's
    ``<|endoftext|>`` is both). ``decode`` stops at the first ``<eos>``.
    """

    def __init__(self, tokenizer: Any) -> None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer of {tokenizer.name_or_path!r} has no eos token: a caption could not end")
        self.hf = tokenizer
        self.eos_id = int(eos)
        self.bos_id = int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else self.eos_id
        self.pad_id = self.eos_id

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LMTokenizer:
        return cls(_transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True))

    def save(self, folder: str | os.PathLike) -> None:
        self.hf.save_pretrained(folder)

    def encode(self, texts: Sequence[str], *, max_length: int) -> Tensor:
        """``(N, L)`` int64 ids, L <= ``max_length``; ``ValueError`` naming a text that does not fit."""
        return decoder_rows(texts, lambda text: self.hf(text, add_special_tokens=False)["input_ids"],
                            bos=self.bos_id, eos=self.eos_id, pad=self.pad_id, max_length=max_length)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of one row of generated ids (without ``<bos>``), up to its first ``<eos>``."""
        kept = []
        for i in ids:
            if int(i) == self.eos_id:
                break
            kept.append(int(i))
        return self.hf.decode(kept, skip_special_tokens=True).strip()

    def token(self, i: int) -> str:
        """How token ``i`` reads on its own (figure titles)."""
        return self.hf.decode([int(i)]).strip() or self.hf.convert_ids_to_tokens(int(i))

    def __len__(self) -> int:
        return len(self.hf)


@dataclass
class LMCache:
    """The LM's ``past_key_values`` and one static :class:`KVCache` (the projected context) per gated block."""

    layers: list[KVCache]
    past: Any = None
    length: int = 0

    def __len__(self) -> int:
        """Tokens decoded so far (the position of the next one)."""
        return self.length

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` of the LM's cache (beam search). The context caches stay: row i attends over
        context row i, as it does without a cache (see :meth:`DecoderCache.reorder`)."""
        if self.past is None:
            return
        if hasattr(self.past, "reorder_cache"):
            self.past.reorder_cache(index)
        else:  # the legacy tuple of (key, value) per layer
            self.past = tuple(tuple(t.index_select(0, index) for t in layer) for layer in self.past)


@dataclass
class _Call:
    """What the hooks need while one forward of the LM runs."""

    context: Tensor
    context_mask: Tensor | None
    caches: list[KVCache] | None
    need_weights: bool
    weights: list[Tensor] = field(default_factory=list)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The LM's stack of layers: the ModuleList with ``num_hidden_layers`` entries (``transformer.h`` in GPT-2,
    ``model.layers`` in Llama-style models)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"found no stack of {count} layers in {type(model).__name__}: not a decoder-only LM")


class GatedLM(nn.Module):
    """A frozen causal LM from a local folder with a :class:`GatedCrossAttention` block after every ``every``-th
    layer (see the module docstring).

    Args:
        path: the LM's folder (``config.json``, weights, tokenizer); loaded with ``local_files_only``.
        context_dim: width of the context tokens the blocks attend over.
        every: a block after layers ``every - 1``, ``2 * every - 1``, ... (1: after every layer).
        num_heads, mlp_ratio, dropout, impl: the blocks' (``num_heads`` must divide the LM's width).
        max_length: the longest sequence decoded; must fit the LM's positions.
    """

    def __init__(self, path: str | os.PathLike, *, context_dim: int, every: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 2.0, dropout: float = 0.0, impl: str | AttentionConfig = "auto",
                 max_length: int | None = None) -> None:
        super().__init__()
        transformers = _transformers()
        folder = resolve_hf_path(path)
        self.path = folder
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        layers = _decoder_layers(self.model)
        if not 1 <= every <= len(layers):
            raise ValueError(f"every must be in [1, {len(layers)}] (the LM's layers), got {every}")
        self.width: int = self.model.config.hidden_size
        self.vocab_size: int = self.model.config.vocab_size
        if self.width % num_heads:
            raise ValueError(f"the LM's width ({self.width}) must be divisible by num_heads ({num_heads})")
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if max_length is not None and positions is not None and max_length > positions:
            raise ValueError(f"max_length={max_length} exceeds the LM's {positions} positions")
        self.at = [i for i in range(len(layers)) if (i + 1) % every == 0]  # layers followed by a block
        self.xattn = nn.ModuleList(
            GatedCrossAttention(self.width, context_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                                impl=impl) for _ in self.at)
        trust_inputs(*self.xattn)  # the owner checks the context once per decode call
        freeze_backbone(self, folder)
        # transformers 5 renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._call: _Call | None = None
        for j, i in enumerate(self.at):
            layers[i].register_forward_hook(self._hook(j))

    def train(self, mode: bool = True) -> GatedLM:
        super().train(mode)
        self.model.eval()  # frozen: no dropout, in training too
        return self

    def _hook(self, j: int) -> Any:
        def after_layer(module: nn.Module, args: Any, output: Any) -> Any:
            call = self._call
            if call is None:  # the LM called on its own: unchanged
                return None
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, D)
            hidden, weights = self.xattn[j](hidden, call.context, context_mask=call.context_mask,
                                            cross_cache=None if call.caches is None else call.caches[j],
                                            need_weights=call.need_weights)
            if weights is not None:
                call.weights.append(weights.float().mean(dim=1))  # (B, T, N)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return after_layer

    def new_cache(self) -> LMCache:
        return LMCache([KVCache(static=True) for _ in self.xattn])

    def forward(self, ids: Tensor, context: Tensor, context_mask: Tensor | None = None, *,
                cache: LMCache | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, T, V)`` and, with ``need_weights``, the blocks' cross-attention weights ``(B, T, N)``
        averaged over heads and blocks. With a ``cache`` only the new tokens are fed."""
        call = _Call(context, context_mask, None if cache is None else cache.layers, need_weights)
        options: dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None and cache.past is not None:
            options[self._cache_arg] = cache.past
        self._call = call
        try:
            out = self.model(input_ids=ids, **options)
        finally:
            self._call = None
        if cache is not None:
            cache.past = out.past_key_values
            cache.length += ids.shape[1]
        weights = torch.stack(call.weights).mean(dim=0) if call.weights else None
        return out.logits, weights

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, width={self.width}, blocks after layers {self.at}"
