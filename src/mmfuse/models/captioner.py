"""Image captioning and generated answers: a vision encoder, then a causal transformer decoder whose blocks
attend over the image tokens (image features as keys/values, the decoder's states as queries).

Shapes::

    I  images      B  sequences (captions, or questions with their answers)      T  decoder tokens
    N  context tokens (image tokens, then question tokens)                        V  vocabulary    C  ``dim``

    images: (I, 3, S, S) uint8 (or float, already normalised)    image_index: (B,) sequence -> image
    ids: (B, T) int64, ``<bos>`` first              logits: (B, T, V), position t predicts token t + 1
    context: (B, N, C)   context_mask: (B, N) bool, True = keep (None: all kept)

Each block is :class:`~mmfuse.layers.AttentionBlock`: causal self-attention, cross-attention over the
context, feed-forward, all pre-norm. Input and output embeddings are tied. For generated answers
(``question_vocab_size > 0``) the question is encoded by a small transformer and its tokens join the
image tokens in the context, so the decoder conditions on both while it writes the answer.

The tokenizer (words of the training captions, plus ``<bos>`` / ``<eos>``) is saved with the model in
``tokenizer.json``; decoding strategies are in :mod:`mmfuse.generate`.

With ``lm`` (a local Hugging Face causal LM folder) the decoder is that frozen LM instead, with gated
cross-attention blocks over the same context after every ``lm_every``-th of its layers (Flamingo,
:class:`~mmfuse.models.gated_lm.GatedLM`); the tokenizer is then the LM's own, saved in ``lm_tokenizer/``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmfuse.attention import KVCache
from mmfuse.data.vocab import WordTokenizer
from mmfuse.encoders.text import TransformerTextEncoder
from mmfuse.encoders.tokenizer import decoder_rows
from mmfuse.encoders.vision import ConvEncoder
from mmfuse.io import CheckpointError, atomic_write_text, dataclass_from_dict, read_json
from mmfuse.layers import AttentionBlock, AttentionPooling
from mmfuse.layers.common import check_mask, check_tokens, gather_rows, trust_inputs, zero_padding
from mmfuse.models.base import PretrainedModel
from mmfuse.models.gated_lm import GatedLM, LMCache, LMTokenizer
from mmfuse.models.vqa import normalize_images

__all__ = ["BOS", "EOS", "PAD", "AnswerGenerator", "CaptionTokenizer", "Captioner", "CaptionerConfig", "DecoderCache"]

PAD, UNK, BOS, EOS = 0, 1, 2, 3
_SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")
_MODEL_TYPE = "captioner"
TOKENIZER_NAME = "tokenizer.json"
LM_TOKENIZER_DIR = "lm_tokenizer"
_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?')])")


class CaptionTokenizer:
    """Words and punctuation (:meth:`WordTokenizer.tokenize`) with ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2,
    ``<eos>`` 3. ``encode`` gives ``<bos> words <eos>`` rows, right-padded; ``decode`` stops at ``<eos>``."""

    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def __init__(self, vocab: Sequence[str]) -> None:
        vocab = list(vocab)
        if tuple(vocab[:4]) != _SPECIAL or len(set(vocab)) != len(vocab):
            raise ValueError(f"vocab must start with {_SPECIAL} and have no duplicates, got {vocab[:4]}")
        self.vocab = vocab
        self._ids = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CaptionTokenizer:
        """Every word of ``texts``, most frequent first (ties A-Z)."""
        counts = Counter(t for text in texts for t in WordTokenizer.tokenize(text))
        return cls([*_SPECIAL, *sorted(counts, key=lambda w: (-counts[w], w))])

    def encode(self, texts: Sequence[str], *, max_length: int) -> Tensor:
        """``(N, L)`` int64 ids: ``<bos>``, the words, ``<eos>``, then ``<pad>``; L <= ``max_length``.

        Raises ``ValueError`` naming the text when one does not fit (a truncated caption would teach the
        decoder to stop early)."""
        return decoder_rows(texts, lambda text: (self._ids.get(t, UNK) for t in WordTokenizer.tokenize(text)),
                            bos=BOS, eos=EOS, pad=PAD, max_length=max_length)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of one row of generated ids (without ``<bos>``), up to its first ``<eos>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>")
        return _NO_SPACE_BEFORE.sub(r"\1", " ".join(words))

    def token(self, i: int) -> str:
        """How token ``i`` reads on its own (figure titles)."""
        return self.vocab[i]

    def __len__(self) -> int:
        return len(self.vocab)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "caption-word", "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaptionTokenizer:
        if d.get("type") != "caption-word":
            raise ValueError(f"not a CaptionTokenizer dict (type={d.get('type')!r})")
        return cls(d["vocab"])


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a :class:`Captioner` (saved as ``config.json``)."""

    vocab_size: int = 0  # the caption tokenizer's size (set from the training split), or the LM's
    image_size: int = 64
    cnn_stages: list[list[int]] = field(default_factory=lambda: [[16], [32], [64]])
    batch_norm: bool = True
    pool_queries: int = 0  # > 0: AttentionPooling of the image tokens to this many latents
    dim: int = 128
    depth: int = 2  # decoder blocks
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    impl: str = "auto"
    max_length: int = 48  # decoder positions, <bos> and <eos> included
    question_vocab_size: int = 0  # > 0: generated answers, the question's word tokenizer size
    question_depth: int = 1
    max_question_length: int = 32
    decoding: Literal["greedy", "beam"] = "greedy"  # what evaluate and predict use
    num_beams: int = 3
    lm: str | None = None  # a Hugging Face causal LM folder ("hf:PATH" or PATH): the frozen decoder (no own one)
    lm_every: int = 2  # with lm: a gated cross-attention block after every lm_every-th LM layer

    def __post_init__(self) -> None:
        if self.lm is not None and self.lm.startswith("hf:"):  # one spelling in saved configs: the folder
            self.lm = self.lm[3:]
        if self.lm == "" or self.lm_every < 1:
            raise ValueError(f"lm must name a Hugging Face model folder (hf:PATH) and lm_every be >= 1, got "
                             f"{self.lm!r}, {self.lm_every}")
        if self.vocab_size <= len(_SPECIAL):
            raise ValueError(f"vocab_size must exceed {len(_SPECIAL)} (the special tokens), got {self.vocab_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.depth < 1 or self.max_length < 2:
            raise ValueError(f"need depth >= 1 and max_length >= 2, got {self.depth}, {self.max_length}")
        if self.decoding not in ("greedy", "beam") or self.num_beams < 1:
            raise ValueError(f"decoding must be 'greedy' or 'beam' with num_beams >= 1, got {self.decoding!r}, "
                             f"{self.num_beams}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaptionerConfig:
        d = dict(d)
        model_type = d.pop("model_type", _MODEL_TYPE)
        if model_type not in (_MODEL_TYPE, "answer-generator"):
            raise ValueError(f"not a captioner config (model_type={model_type!r})")
        return dataclass_from_dict(cls, d, "config keys")


class DecoderCache:
    """One (self-attention, cross-attention) :class:`KVCache` pair per decoder block; the self-attention
    caches preallocate ``capacity`` positions (the decoder's ``max_length``)."""

    def __init__(self, depth: int, capacity: int | None = None) -> None:
        self.layers = [(KVCache(capacity=capacity), KVCache(static=True)) for _ in range(depth)]

    def __len__(self) -> int:
        """Tokens decoded so far (the position of the next one)."""
        return len(self.layers[0][0])

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` of the self-attention caches (beam search). The cross-attention caches stay:
        row i keeps attending over context row i, as it does without a cache (the caller reorders no context,
        and beam search only moves hypotheses among rows that share one)."""
        for self_cache, _ in self.layers:
            self_cache.reorder(index)


class Captioner(PretrainedModel):
    """The captioning / answer-generating model; see the module docstring for shapes."""

    model_type = _MODEL_TYPE
    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig, *, tokenizer: CaptionTokenizer | LMTokenizer,
                 question_tokenizer: WordTokenizer | None = None) -> None:
        super().__init__()
        if isinstance(tokenizer, LMTokenizer) != (config.lm is not None):
            raise ValueError("the tokenizer must be the LM's (LMTokenizer) exactly when config.lm is set")
        if config.lm is None and len(tokenizer) != config.vocab_size:
            raise ValueError(f"config.vocab_size={config.vocab_size} but the tokenizer has {len(tokenizer)} words")
        if (question_tokenizer is None) != (config.question_vocab_size == 0) or (
                question_tokenizer is not None and len(question_tokenizer) != config.question_vocab_size):
            raise ValueError("question_tokenizer must be given exactly when config.question_vocab_size > 0, "
                             "with that many words")
        self.config = c = config
        self.tokenizer = tokenizer
        self.vision = ConvEncoder(c.cnn_stages, batch_norm=c.batch_norm, image_size=c.image_size)
        self.pool = (AttentionPooling(self.vision.out_dim, num_queries=c.pool_queries, num_heads=c.num_heads,
                                      impl=c.impl) if c.pool_queries > 0 else None)
        self.image_proj = nn.Linear(self.vision.out_dim, c.dim)
        self.question: TransformerTextEncoder | None = None
        if question_tokenizer is not None:
            self.question = TransformerTextEncoder(question_tokenizer, dim=c.dim, depth=c.question_depth,
                                                   num_heads=c.num_heads, max_length=c.max_question_length,
                                                   dropout=c.dropout, impl=c.impl)
            self.type_embed = nn.Parameter(torch.zeros(2, c.dim))  # image / question tokens of the context
        self.lm: GatedLM | None = None
        if c.lm is not None:
            self.lm = GatedLM(c.lm, context_dim=c.dim, every=c.lm_every, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                              dropout=c.dropout, impl=c.impl, max_length=c.max_length)
            if self.lm.vocab_size != c.vocab_size:
                raise ValueError(f"config.vocab_size={c.vocab_size} but the LM in {c.lm} has {self.lm.vocab_size}")
            self.init_weights()
            return
        self.embed = nn.Embedding(c.vocab_size, c.dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.empty(c.max_length, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            AttentionBlock(c.dim, context_dim=c.dim, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                           dropout=c.dropout, impl=c.impl) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        trust_inputs(*self.blocks)  # decode checks the context once, not in every block at every step
        self.init_weights()

    def init_weights(self) -> None:
        if self.lm is None:
            nn.init.trunc_normal_(self.embed.weight, std=0.02)
            with torch.no_grad():
                self.embed.weight[PAD].zero_()
            nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.xavier_uniform_(self.image_proj.weight)
        nn.init.zeros_(self.image_proj.bias)

    # ----------------------------------------------------------------------------------------------
    def encode(self, images: Tensor, question_ids: Tensor | None = None, question_mask: Tensor | None = None,
               image_index: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The decoder's context: ``(context (B, N, C), context_mask (B, N) | None)``.

        Images are encoded once each; ``image_index`` (B,) maps sequences to images (None: one each).
        """
        tokens = self.vision(normalize_images(images))  # (I, h*w, C_vision)
        if self.pool is not None:
            tokens, _ = self.pool(tokens)  # (I, pool_queries, C_vision)
        context = self.image_proj(tokens)  # (I, Ni, C)
        if image_index is not None:
            context = gather_rows(context, image_index)  # (B, Ni, C)
        if self.question is None:
            if question_ids is not None:
                raise ValueError("this captioner takes no question (it was trained without one)")
            return context, None
        if question_ids is None or question_mask is None:
            raise ValueError("this model answers questions: pass question_ids and question_mask (tokenize_questions)")
        if question_ids.shape[0] != context.shape[0]:
            raise ValueError(f"{context.shape[0]} image contexts for {question_ids.shape[0]} questions: pass "
                             "image_index")
        words = self.question(question_ids, question_mask)  # (B, Lq, C)
        context = torch.cat([context + self.type_embed[0], words + self.type_embed[1]], dim=1)  # (B, Ni + Lq, C)
        image_mask = torch.ones(context.shape[0], context.shape[1] - words.shape[1], dtype=torch.bool,
                                device=context.device)
        return context, torch.cat([image_mask, question_mask], dim=1)

    def decode(self, ids: Tensor, context: Tensor, context_mask: Tensor | None = None, *,
               cache: DecoderCache | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, T, V)`` of the token after each of ``ids`` (B, T), and with ``need_weights`` the
        cross-attention weights ``(B, T, N)`` averaged over heads and blocks (where each token looked).

        With a ``cache`` only the new tokens are fed; their positions follow the cached ones.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, T), got {tuple(ids.shape)}")
        start = len(cache) if cache is not None else 0
        T = ids.shape[1]
        if start + T > self.config.max_length:
            raise ValueError(f"{start + T} decoder positions, more than max_length={self.config.max_length}")
        if start == 0:  # later steps reuse the context the caches were filled from
            check_tokens(context, self.config.dim, "context", batch=ids.shape[0], seq="N")
            check_mask(context_mask, context, "context_mask")
            context = zero_padding(context, context_mask)
        if self.lm is not None:
            return self.lm(ids, context, context_mask, cache=cache, need_weights=need_weights)
        x = self.drop(self.embed(ids) + self.pos[start:start + T])  # (B, T, C)
        weights = []
        for i, block in enumerate(self.blocks):
            self_cache, cross_cache = cache.layers[i] if cache is not None else (None, None)
            x, w = block(x, context, context_mask=context_mask, causal=True, self_cache=self_cache,
                         cross_cache=cross_cache, need_weights=need_weights)
            if w is not None:
                weights.append(w.float().mean(dim=1))  # (B, T, N)
        logits = self.norm(x) @ self.embed.weight.T  # (B, T, V), tied to the input embedding
        return logits, (torch.stack(weights).mean(dim=0) if weights else None)

    def forward(self, images: Tensor, ids: Tensor, image_index: Tensor | None = None,
                question_ids: Tensor | None = None, question_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits ``(B, T, V)`` for ``ids`` (``<bos>`` first)."""
        context, context_mask = self.encode(images, question_ids, question_mask, image_index)
        return self.decode(ids, context, context_mask)[0]

    def new_cache(self) -> DecoderCache | LMCache:
        if self.lm is not None:
            return self.lm.new_cache()
        return DecoderCache(len(self.blocks), self.config.max_length)

    # ----------------------------------------------------------------------------------------------
    def tokenize_questions(self, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        if self.question is None:
            raise ValueError("this captioner takes no question")
        return self.question.tokenize(list(questions))

    @torch.no_grad()
    def generate(self, images: Tensor, questions: Sequence[str] | None = None, *, need_weights: bool = False,
                 **options: Any) -> tuple[list[str], Any]:
        """Texts generated for ``images`` (I, 3, S, S) (and their ``questions``, one per image).

        ``options`` go to :func:`mmfuse.generate.generate` (strategy, num_beams, max_new_tokens, ...); by
        default the config's ``decoding``. Returns the texts and the :class:`~mmfuse.generate.Generated`.
        """
        from mmfuse.generate import generate

        q_ids = q_mask = None
        if questions is not None:
            q_ids, q_mask = self.tokenize_questions(questions)
            q_ids, q_mask = q_ids.to(images.device), q_mask.to(images.device)
        context, context_mask = self.encode(images, q_ids, q_mask)
        options.setdefault("strategy", self.config.decoding)
        if options["strategy"] == "beam":
            options.setdefault("num_beams", self.config.num_beams)
        options.setdefault("max_new_tokens", self.config.max_length - 1)
        for name in ("bos", "eos", "pad"):
            options.setdefault(name, getattr(self.tokenizer, f"{name}_id"))
        out = generate(self, context, context_mask, need_weights=need_weights, **options)
        return [self.tokenizer.decode(row) for row in out.tokens.tolist()], out

    # ----------------------------------------------------------------------------------------------
    def save_extra(self, directory: Path) -> None:
        if isinstance(self.tokenizer, LMTokenizer):  # the LM's files, so the checkpoint holds what it decodes with
            self.tokenizer.save(directory / LM_TOKENIZER_DIR)
            decoder = {"type": "hf", "folder": LM_TOKENIZER_DIR}
        else:
            decoder = self.tokenizer.to_dict()
        d: dict[str, Any] = {"format": 1, "decoder": decoder}
        if self.question is not None:
            d["question"] = self.question.tokenizer.to_dict()
        atomic_write_text(directory / TOKENIZER_NAME, json.dumps(d, indent=1) + "\n")

    @classmethod
    def from_config(cls, config: CaptionerConfig, directory: Path | None = None) -> Captioner:
        if directory is None:
            raise ValueError("a captioner needs its tokenizer.json: pass the directory, or build Captioner(...)")
        path = directory / TOKENIZER_NAME
        try:
            d = read_json(path)
            tokenizer = (LMTokenizer.load(directory / d["decoder"]["folder"]) if d["decoder"].get("type") == "hf"
                         else CaptionTokenizer.from_dict(d["decoder"]))
            question = WordTokenizer.from_dict(d["question"]) if "question" in d else None
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from e
        return cls(config, tokenizer=tokenizer, question_tokenizer=question)


class AnswerGenerator(Captioner):
    """A :class:`Captioner` that conditions on a question too (``vqa-generate``); its own ``model_type`` lets
    ``mmfuse evaluate`` pick the right task for a saved run."""

    model_type = "answer-generator"
