"""The ``mmfuse`` command: train, evaluate, predict, ablate, robustness, serve, export.

Every command prints its result; errors in the user's input (a bad argument, a dataset line, a
checkpoint file) end with one line ``mmfuse: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mmfuse import __version__
from mmfuse import fusion as fusion_registry
from mmfuse.attention import IMPLS
from mmfuse.device import PRECISIONS
from mmfuse.presets import PRESETS, apply_preset

__all__ = ["main"]

log = logging.getLogger("mmfuse")


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none (None, False) or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is one ``--help`` away) and defaults in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name``, for help texts of flags whose argparse default is None
    (None there means "not given", which ``--resume`` needs to tell apart)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _vqa_default(name: str) -> str:
    from mmfuse.models.vqa import VQAConfig

    return f"(default: {_default(VQAConfig, name)})"


def _train_default(name: str) -> str:
    from mmfuse.train import TrainConfig

    return f"(default: {_default(TrainConfig, name)})"


def _add_device(p: argparse.ArgumentParser, *, precision: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    if precision:
        p.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="autocast precision; auto: bf16 on GPUs that support it and on CPUs where native bf16 "
                            "is measured faster than fp32, else fp32 (default: the run's own, else auto)")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="easy-vqa",
                   help="'easy-vqa' (built in) or a directory with train/test .jsonl or .parquet (default: easy-vqa)")


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of GiB >= 0, got {text!r}")
    return value


def _add_image_storage(p: Any, default: str = "the run's own, else auto",
                       default_gb: str = "the run's own, else 2") -> None:
    """``--image-storage`` and ``--image-memory-gb`` (see :mod:`mmfuse.data.storage`)."""
    from mmfuse.data.storage import STORAGES

    p.add_argument("--image-storage", choices=STORAGES,
                   help="where decoded images live: memory, disk (a memory-mapped .npy in $MMFUSE_CACHE/images, "
                        f"decoded once and reused), or auto: disk for a split larger than --image-memory-gb "
                        f"(default: {default})")
    p.add_argument("--image-memory-gb", type=_gib, metavar="GIB",
                   help=f"--image-storage auto: GiB of decoded images a split may hold in memory (default: "
                        f"{default_gb})")


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields --image-storage and --image-memory-gb set, where given."""
    return {k: getattr(args, k) for k in ("image_storage", "image_memory_gb") if getattr(args, k) is not None}


def _storage_defaults() -> tuple[str, str]:
    from mmfuse.train import TrainConfig

    return str(_default(TrainConfig, "image_storage")), f"{_default(TrainConfig, 'image_memory_gb'):g}"


def _image_storage(args: argparse.Namespace, run: Path | None = None) -> Any:
    """The ImageStorage of --image-storage / --image-memory-gb, each defaulting to the setting of the run in
    ``run`` (its run.json), else to auto / 2 GiB."""
    from mmfuse.data import ImageStorage
    from mmfuse.runs import RUN_CONFIG, read_run_config

    saved = ImageStorage()
    if run is not None and (run / RUN_CONFIG).is_file():
        try:
            saved = ImageStorage.from_settings(read_run_config(run))
        except ValueError as e:
            raise UsageError(f"{run / RUN_CONFIG}: {e}") from e
    return ImageStorage(args.image_storage or saved.mode,
                        saved.memory_gb if args.image_memory_gb is None else args.image_memory_gb)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    d = _vqa_default
    g = p.add_argument_group("model")
    g.add_argument("--fusion", choices=fusion_registry.available(), help=f"fusion by name {d('fusion')}")
    g.add_argument("--vision", type=_encoder_choice("cnn", "vgg11", "vgg16"), metavar="{cnn,vgg11,vgg16,hf:PATH}",
                   help=f"vision encoder; hf:PATH a local Hugging Face vision model, frozen {d('vision')}")
    g.add_argument("--vision-finetune", action="store_true", default=None,
                   help="train the hf:PATH vision model too (default: frozen)")
    g.add_argument("--vgg-width", type=float, help=f"channel multiplier of VGG, 1.0 = the original {d('vgg_width')}")
    g.add_argument("--cnn-coordinates", action=argparse.BooleanOptionalAction, default=None,
                   help=f"--vision cnn: each pixel's x and y as two more input channels (CoordConv) "
                        f"{d('cnn_coordinates')}")
    g.add_argument("--pool-queries", type=int,
                   help=f"pool the image tokens to this many latents first, 0: off {d('pool_queries')}")
    g.add_argument("--text", type=_encoder_choice("transformer", "hf"), metavar="{transformer,hf,hf:PATH}",
                   help=f"own small transformer, the bundled MiniLM (hf), or a local Hugging Face model {d('text')}")
    g.add_argument("--text-pooling", choices=["none", "cls", "mean"],
                   help=f"a Hugging Face text model's tokens, or one pooled token {d('text_pooling')}")
    g.add_argument("--hf-path", help="folder of a Hugging Face model (default with --text hf: the bundled MiniLM)")
    g.add_argument("--hf-finetune", action="store_true", help="train the Hugging Face encoder too (default: frozen)")
    g.add_argument("--dim", type=int, help=f"fusion width {d('dim')}")
    g.add_argument("--depth", type=int, help=f"fusion blocks {d('depth')}")
    g.add_argument("--num-heads", type=int, help=f"attention heads {d('num_heads')}")
    g.add_argument("--dropout", type=float, help=f"dropout probability {d('dropout')}")
    g.add_argument("--head-hidden", type=int,
                   help=f"hidden units of the answer head's MLP, 0: a linear head {d('head_hidden')}")
    g.add_argument("--impl", choices=list(IMPLS), help=f"attention implementation {d('impl')}")
    g.add_argument("--window", type=int, help="--impl local: keys each query sees (required with local)")
    g.add_argument("--num-global", type=int, help="--impl local: leading tokens every query sees (default: 0)")
    g.add_argument("--rank", type=int, help="--impl lowrank: rows keys and values are projected to (required)")
    g.add_argument("--block-q", type=int, help="--impl chunked/local: queries per tile (default: 512, local 256)")
    g.add_argument("--block-k", type=int, help="--impl chunked/local: keys per tile (default: 1024)")
    g.add_argument("--image-size", type=int, help=f"images are resized to this square size {d('image_size')}")
    g.add_argument("--fusion-options", type=_json_object, metavar="JSON",
                   help='extra arguments of the fusion, e.g. \'{"image_depth": 0}\' (replaces a preset\'s)')
    g.add_argument("--resize", choices=["squash", "pad", "crop"],
                   help=f"non-square images: stretch, letterbox on black, or centre-crop {d('resize')}")
    g = p.add_argument_group("caption decoder (--task caption, vqa-generate)")
    g.add_argument("--lm", type=_encoder_choice(), metavar="hf:PATH",
                   help="decode with this local Hugging Face causal LM (GPT-2 style), frozen, with gated "
                        "cross-attention over the image (default: the task's own small decoder)")
    g.add_argument("--lm-every", type=int,
                   help="with --lm: a gated cross-attention block after every N-th LM layer (default: 2)")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _encoder_choice(*names: str) -> Any:
    """An argparse type accepting ``names`` or ``hf:PATH``."""

    def parse(value: str) -> str:
        if value in names or (value.startswith("hf:") and len(value) > 3):
            return value
        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join((*names, 'hf:PATH'))})")

    return parse


def _classify_default(name: str) -> str:
    from mmfuse.models.classifier import ImageClassifierConfig

    return f"(default: {_default(ImageClassifierConfig, name)})"


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers such as 2,3,4,5, got {text!r}") from e


def _rgb(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) == 3 and all(x.strip().isdigit() and int(x) <= 255 for x in parts):
        return int(parts[0]), int(parts[1]), int(parts[2])
    raise argparse.ArgumentTypeError(f"expected three integers in 0-255 such as 0,0,0, got {text!r}")


def _add_classify_args(p: argparse.ArgumentParser) -> None:
    """The classify task's model flags (the other classifier settings share the VQA flags' names)."""
    from mmfuse.models.classifier import BACKBONES

    d = _classify_default
    g = p.add_argument_group("classifier (--task classify)")
    g.add_argument("--backbone", choices=BACKBONES, help=f"image backbone; resnet is the no-context baseline "
                   f"{d('backbone')}")
    g.add_argument("--width", type=float, help=f"backbone channel multiplier, 1.0 = the original {d('width')}")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help=f"BatchNorm after every VGG conv {d('batch_norm')}")
    g.add_argument("--context", choices=["none", "text", "image"],
                   help="the context the classifier reads (default: the data's for VGG, none for ResNet)")
    g.add_argument("--context-dim", type=int, help=f"width of the context tokens {d('context_dim')}")
    g.add_argument("--context-depth", type=int, help=f"blocks of the context text encoder {d('context_depth')}")
    g.add_argument("--levels", type=_levels, help="VGG blocks (2-5) whose maps cross-attend to the context, "
                   "comma-separated (default: 5)")
    g.add_argument("--head", choices=["mean", "flatten"],
                   help=f"classifier input: the averaged or the flattened last map {d('head')}")
    g.add_argument("--attn-dropout", type=float, help=f"dropout of the attention {d('attn_dropout')}")
    g.add_argument("--residual", choices=["norm", "gate"],
                   help=f"how each level's attention joins the map: post-LayerNorm, or a tanh gate from 0 "
                        f"{d('residual')}")
    g.add_argument("--mlp-ratio", type=float,
                   help=f"> 0: a position-wise MLP (this many x channels wide) after each level's attention "
                        f"{d('mlp_ratio')}")


def _model_fields() -> set[str]:
    """The fields of every task's model config: a flag named as one of them sets it."""
    from mmfuse import tasks

    return {f.name for name in tasks.available() for f in dataclasses.fields(tasks.create(name).config_class)}


def _model_options(args: argparse.Namespace, task: str = "vqa") -> dict[str, Any]:
    """The fields of ``task``'s model config given on the command line (flags are named as the fields they
    set); a flag given for another task's model is an error."""
    from mmfuse import tasks

    own = {f.name for f in dataclasses.fields(tasks.create(task).config_class)}
    given = {name for name in _model_fields() | {"hf_finetune"} if getattr(args, name, None) not in (None, False)}
    foreign = sorted(given - own - ({"hf_finetune"} if "hf_freeze" in own else set()))
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise UsageError(f"{flags}: not a setting of the {task} task's model")
    options = {name: getattr(args, name) for name in own if getattr(args, name, None) is not None}
    if getattr(args, "hf_finetune", False):
        options["hf_freeze"] = False
    vision = str(options.get("vision", ""))
    if vision.startswith("hf:") and "image_size" not in options:  # decode images at the model's own size
        from mmfuse.encoders.hf_vision import image_size

        options["image_size"] = image_size(vision[3:])
    return options


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = _train_default
    g = p.add_argument_group("training")
    g.add_argument("--task", help=f"what to train: {_task_names()} {d('task')}")
    g.add_argument("--epochs", type=int, help=f"epochs {d('epochs')}")
    g.add_argument("--seed", type=int, help=f"seed of initialisation and batch order {d('seed')}")
    g.add_argument("--images-per-batch", type=int,
                   help=f"images per step; each brings all of its questions {d('images_per_batch')}")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], help=f"optimizer {d('optimizer')}")
    g.add_argument("--lr", type=float, help=f"peak learning rate {d('lr')}")
    g.add_argument("--momentum", type=float, help=f"SGD momentum {d('momentum')}")
    g.add_argument("--weight-decay", type=float,
                   help=f"decoupled weight decay of linear, conv and token-embedding weights {d('weight_decay')}")
    g.add_argument("--schedule", choices=["cosine", "step", "constant"], help=f"after warmup {d('schedule')}")
    g.add_argument("--warmup-steps", type=int, help=f"linear warmup steps {d('warmup_steps')}")
    g.add_argument("--step-epochs", type=int, help=f"StepLR: decay every N epochs {d('step_epochs')}")
    g.add_argument("--step-gamma", type=float, help=f"StepLR: decay factor {d('step_gamma')}")
    g.add_argument("--attention-lr-mult", type=float,
                   help=f"learning-rate multiplier for attention layers {d('attention_lr_mult')}")
    g.add_argument("--attention-l2", type=float, help=f"L2 penalty on attention projection weights {d('attention_l2')}")
    g.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0: off {d('grad_clip')}")
    g.add_argument("--label-smoothing", type=float, help=f"cross-entropy label smoothing {d('label_smoothing')}")
    g.add_argument("--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="autocast precision; auto: bf16 on GPUs that support it and on CPUs where native bf16 is "
                        "measured faster than fp32 on the first batch, else fp32 (default: auto)")
    g.add_argument("--bf16", action="store_const", const="bf16", dest="precision",
                   help="the same as --precision bf16")
    g.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile the model (default: off)")
    g.add_argument("--threads", type=int,
                   help="CPU threads (default: the cores other work is not using now)")
    g.add_argument("--checkpoint-every", type=int,
                   help=f"also checkpoint every N steps within an epoch, 0: off {d('checkpoint_every')}")
    g.add_argument("--eval-split", help=f"split evaluated during and after training, e.g. val {d('eval_split')}")
    g.add_argument("--eval-every", type=int, help=f"evaluate every N epochs, 0: only at the end {d('eval_every')}")
    _add_image_storage(g, *_storage_defaults())


def _task_names() -> str:
    from mmfuse import tasks

    return ", ".join(tasks.available())


def _train_fields() -> list[str]:
    from mmfuse.train import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "out", "progress", "model")]


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    return {f: getattr(args, f) for f in _train_fields() if getattr(args, f, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmfuse", description="Attention-based fusion of images and text.")
    parser.add_argument("--version", action="version", version=f"mmfuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train a VQA model (default: easy-VQA, the default model)")
    _add_data(p)
    p.add_argument("--out", help="run directory (default: runs/<fusion>-seed<seed>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run with its own settings")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out (default: refuse)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although the dataset changed since the run was checkpointed")
    p.add_argument("--report", action="store_true", help="write RUN_DIR/report.md after training")
    p.add_argument("--json", action="store_true", help="print the last epoch's metrics as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--preset", "--recipe", dest="preset", choices=sorted(PRESETS),
                   help="start from a named recipe; flags given here override it (seed003: SGD momentum 0.9, "
                        "StepLR every 5 epochs x0.1, 10x attention learning rate; sort-of-clevr: see the README)")
    _add_model_args(p)
    _add_classify_args(p)
    _add_train_args(p)

    p = sub.add_parser("evaluate", help="accuracy of a trained model on a split")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a run directory (or saved model)")
    p.add_argument("--data", help="dataset (default: the one the model was trained on)")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--predictions", metavar="FILE.jsonl", help="write one JSON line per question")
    p.add_argument("--confusion", metavar="FILE.png", help="write the confusion matrix")
    p.add_argument("--num-beams", type=int, help="captioner: beam search with this many beams (default: the "
                                                  "model's own decoding)")
    _add_image_storage(p)
    _add_device(p)
    p.add_argument("--bf16", action="store_const", const="bf16", dest="precision", help="the same as --precision bf16")

    p = sub.add_parser("predict", help="answer one question about one image, caption it, classify it, or "
                       "answer every line of a split")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a run directory (or saved model)")
    p.add_argument("--image", metavar="PATH", help="an image file")
    p.add_argument("--question", metavar="TEXT", help="the question (VQA models)")
    p.add_argument("--context", metavar="TEXT", help="the text context (classifiers that read one)")
    p.add_argument("--context-image", metavar="PATH", help="the context image (classifiers that read one)")
    p.add_argument("--data", metavar="DIR", help="VQA models, instead of --image/--question: a dataset directory, "
                   "every line of --split answered (lines need no 'answer') into --predictions")
    p.add_argument("--split", default="test", metavar="NAME", help="the split of --data: NAME.jsonl or NAME.parquet")
    p.add_argument("--predictions", metavar="OUT.jsonl", help="with --data: one JSON line per question")
    _add_image_storage(p)
    p.add_argument("--attention-map", metavar="OUT.png", help="write the attention over the image")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_device(p)
    g = p.add_argument_group("generation (captioner models)")
    g.add_argument("--strategy", choices=["greedy", "beam", "sample"], help="decoding (default: the model's own)")
    g.add_argument("--num-beams", type=int, help="beams of beam search (default: the model's own)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: GNMT length penalty exponent")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=0, help="sampling: only the k most likely tokens, 0: all")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling: only the nucleus of this mass")
    g.add_argument("--max-new-tokens", type=int, help="at most this many tokens (default: the model's max_length - 1)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")

    p = sub.add_parser("ablate", help="train several fusions with the same budget and tabulate them")
    _add_data(p)
    p.add_argument("--task", choices=["vqa", "classify"], default="vqa",
                   help="vqa: compare fusions; classify: compare classifier variants (--variants)")
    p.add_argument("--fusions", help="comma-separated fusion names (default: a representative set)")
    p.add_argument("--variants", help="--task classify: comma-separated variants (default: vgg16, vgg16-xattn, "
                   "vgg16-xattn-8h, vgg16-xattn-mlp, vgg16-multilevel, vgg16-multilevel-gate, resnet18)")
    p.add_argument("--preset", "--recipe", dest="preset", choices=sorted(PRESETS),
                   help="a named recipe of training settings (see mmfuse train --help)")
    p.add_argument("--width", type=float, help="--task classify: backbone channel multiplier (default: 1.0)")
    p.add_argument("--image-size", type=int, help="images are resized to this square size (default: the data's)")
    p.add_argument("--images-per-batch", type=int, help="batch size (default: the training default)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's, else the training default)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores not already busy)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fusion (default: the training default)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--out", default="runs/ablation", help="folder of the runs and the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_image_storage(p, *_storage_defaults())
    _add_device(p)

    p = sub.add_parser("make-dataset", help="write a synthetic dataset as a JSONL directory")
    p.add_argument("kind", choices=["relational", "sort-of-clevr", "context", "captions"],
                   help="relational: several shapes per image, questions about their spatial relations; "
                        "sort-of-clevr: the benchmark of Santoro et al. 2017 (six objects, 75 px); "
                        "context: several shapes per image, a context names one, the label is its shape; "
                        "captions: 2-4 shapes per image described left to right")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--train-images", type=int,
                   help="default: 4000 (relational, context), 9800 (sort-of-clevr), 8000 (captions)")
    p.add_argument("--test-images", type=int, help="default: 1000 (relational, context, captions), 200 (sort-of-clevr)")
    p.add_argument("--image-size", type=int, help="default: 64 (relational, context), 75 (sort-of-clevr)")
    p.add_argument("--objects", type=int, default=4, help="objects per image (relational, context; captions: at most)")
    p.add_argument("--object-radius", type=int, default=5, help="half the object width in pixels (sort-of-clevr)")
    p.add_argument("--background", type=_rgb, default=(255, 255, 255), metavar="R,G,B",
                   help="sort-of-clevr: the fill behind the objects (default: 255,255,255, the paper's white)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--context", choices=["text", "image"], default="text",
                   help="context: name the object's colour (text) or show it (an image)")
    p.add_argument("--label", choices=["shape", "position"], default="shape",
                   help="context: the label is the named object's shape, or the quadrant it sits in")

    p = sub.add_parser("robustness", help="accuracy under image and text perturbations")
    p.add_argument("--checkpoint", required=True, action="append", metavar="RUN_DIR",
                   help="a trained run (repeat to compare several)")
    p.add_argument("--data", help="dataset (default: the one the first model was trained on)")
    p.add_argument("--split", default="test", help="split to perturb")
    p.add_argument("--out", default="runs/robustness", help="folder of the report")
    p.add_argument("--limit", type=int, help="evaluate only the first N images' questions")
    p.add_argument("--seed", type=int, default=0, help="seed of the random perturbations")
    _add_image_storage(p, "the first run's own, else auto", "the first run's own, else 2")
    _add_device(p, precision=False)

    p = sub.add_parser("serve", help="HTTP API and a page that answer questions about uploaded images")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="the trained run to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests in one forward pass (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to batch with (default: 5)")
    p.add_argument("--max-upload-bytes", type=int, default=5_000_000,
                   help="larger bodies get 413 (default: 5000000)")
    p.add_argument("--max-pixels", type=int, default=16_000_000,
                   help="larger images (width x height, from the header) get 400 (default: 16000000)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    _add_device(p, precision=False)

    p = sub.add_parser("export", help="write a trained model as ONNX, TorchScript or a torch.export program")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="the trained run to export")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "torch-export"], help="file format")
    p.add_argument("--out", required=True, metavar="FILE", help="model file (torch-export: *.pt2); FILE.json beside it")
    return parser


# --------------------------------------------------------------------------------------------------


def _run_data(run_dir: Path) -> str:
    from mmfuse.runs import RUN_CONFIG, read_run_config

    try:
        return read_run_config(run_dir)["data"]
    except (ValueError, KeyError) as e:  # read_json's CheckpointError is a ValueError
        raise UsageError(f"{run_dir}: no {RUN_CONFIG} with the training data; pass --data") from e


# Settings that --resume accepts: where and how fast the run continues, not what it computes.
_RESUME_OK = frozenset({"device", "threads", "compile", "image_storage", "image_memory_gb"})


def _resume_conflicts(args: argparse.Namespace) -> list[str]:
    """The flags given with --resume that set a training or model setting (which the run already has)."""
    fields = {*_train_fields(), *_model_fields(), "hf_finetune"} - _RESUME_OK
    fields.add("preset")
    given = [name for name, value in vars(args).items() if name in fields and value not in (None, False)]
    return ["--" + name.replace("_", "-") for name in sorted(given)]


def _default_out(task: str, model: dict[str, Any], seed: int) -> str:
    """runs/<fusion>-seed<seed> for VQA, runs/<task>-seed<seed> for the other tasks."""
    if task == "vqa":
        from mmfuse.models import VQAConfig

        return f"runs/{model.get('fusion', VQAConfig.__dataclass_fields__['fusion'].default)}-seed{seed}"
    return f"runs/{task}-seed{seed}"


def cmd_train(args: argparse.Namespace) -> int:
    from mmfuse.train import TrainConfig, Trainer, distributed, resume

    progress = False if args.no_progress else None
    with distributed(args.device or "auto") as (rank, _):
        if args.resume:
            conflicts = _resume_conflicts(args)
            if conflicts:
                raise UsageError(f"--resume continues a run with its own settings; drop {', '.join(conflicts)}")
            overrides = {k: getattr(args, k) for k in _RESUME_OK - {"device"} if getattr(args, k) is not None}
            result = resume(args.resume, device=args.device, progress=progress,
                            allow_data_change=args.allow_data_change, **overrides)
            out = Path(args.resume)
        else:
            preset_train = apply_preset(args.preset, {}, {})[0] if args.preset else {}
            options = {**preset_train, **_train_options(args)}
            task = options.get("task", "vqa")
            model = _model_options(args, task)
            if args.preset:
                model = apply_preset(args.preset, {}, model)[1]
            # a task may bring its own recipe (e.g. caption); a preset and the flags given here win over it
            from mmfuse import tasks

            options = {**tasks.create(task).train_defaults, **options}
            out = Path(args.out or _default_out(task, model, options.get("seed", 0)))
            cfg = TrainConfig(data=args.data, out=str(out), progress=progress, model=model, **options)
            result = Trainer(cfg, overwrite=args.overwrite).fit()
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=None))
        print(f"model saved in {out}")
    if args.report:
        if _is_classifier_run(out):
            from mmfuse.classify_report import write_report
        else:
            from mmfuse.report import write_report

        report = write_report(out)
        if not args.json:
            print(f"report: {report}")
    return 0


def _is_classifier_run(run: Path) -> bool:
    from mmfuse.io import read_json
    from mmfuse.models.classifier import MODEL_TYPE

    return read_json(run / "config.json").get("model_type") == MODEL_TYPE


def _load_model(run: Path, device: str) -> Any:
    from mmfuse.device import resolve_device
    from mmfuse.models import PretrainedModel

    return PretrainedModel.from_pretrained(run, device=resolve_device(device))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmfuse import tasks
    from mmfuse.device import resolve_precision

    run = Path(args.checkpoint)
    model = _load_model(run, args.device)
    task = tasks.for_model(model)
    device = next(model.parameters()).device
    data = args.data or _run_data(run)
    split = task.load_split(data, args.split, **task.load_options(model), storage=_image_storage(args, run))
    if args.num_beams and model.model_type not in ("captioner", "answer-generator"):
        raise UsageError(f"--num-beams: {args.checkpoint} holds a {model.model_type} model, which generates nothing")
    decoding = {"strategy": "beam", "num_beams": args.num_beams} if args.num_beams else {}
    result = task.evaluate(model, split, device=device, precision=resolve_precision(args.precision, device),
                           **decoding)
    summary = result.summary()
    if args.predictions:
        task.write_predictions(result, args.predictions)
    if args.confusion:
        from mmfuse.report import plot_confusion

        plot_confusion(result, args.confusion)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.split}: {task.metric} {summary[task.metric]:.4f} on {summary['num_examples']} examples")
        for key, value in summary.items():
            if isinstance(value, dict):
                print(f"  {key}:")
                for name, acc in value.items():
                    print(f"  {name:>20s}  {acc:.4f}")
            elif task.metric == "exact_match" and key != task.metric and isinstance(value, float):
                print(f"  {key}: {value:.4f}")  # a caption model's BLEU-4 and CIDEr
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mmfuse.data import load_image
    from mmfuse.models import VQAModel

    storage_flags = [f for f, v in (("--image-storage", args.image_storage),
                                    ("--image-memory-gb", args.image_memory_gb)) if v is not None]
    if storage_flags and not args.data:
        raise UsageError(f"{', '.join(storage_flags)}: only with --data (a single --image is decoded in memory)")
    model = _load_model(Path(args.checkpoint), args.device)
    from mmfuse.models.classifier import ImageClassifier

    if isinstance(model, ImageClassifier):
        if args.image is None:
            raise UsageError(f"{args.checkpoint} is an image classifier: pass --image")
        return _predict_class(model, args)
    if model.model_type in ("captioner", "answer-generator"):
        if args.image is None:
            raise UsageError(f"{args.checkpoint} writes text about an image: pass --image")
        return _predict_caption(model, args)
    if not isinstance(model, VQAModel):
        raise UsageError(f"{args.checkpoint}: predict answers questions with a VQA model, this is a "
                         f"{model.model_type} model")
    device = next(model.parameters()).device
    if args.data:
        return _predict_split(model, args)
    if not (args.image and args.question):
        raise UsageError(f"{args.checkpoint} is a VQA model: pass --image and --question, or --data and "
                         "--predictions")
    image = load_image(args.image, model.config.image_size, resize=model.config.resize)  # (3, S, S) uint8
    probs = model.answer(image[None].to(device), [args.question])[0].cpu()
    top = probs.topk(min(5, len(probs)))
    names = model.answers.names
    ranked = [(names[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    if args.attention_map:
        from mmfuse.report import attention_map

        attention_map(model, image.to(device), args.question, args.attention_map)
    if args.json:
        print(json.dumps({"question": args.question, "answer": ranked[0][0], "top5": ranked}))
    else:
        print(f"{args.question} -> {ranked[0][0]}")
        for name, p in ranked:
            print(f"  {p:6.1%}  {name}")
    if args.attention_map:
        print(f"attention map: {args.attention_map}")
    return 0


def _predict_split(model: Any, args: argparse.Namespace) -> int:
    from mmfuse import tasks
    from mmfuse.data import load_split
    from mmfuse.device import resolve_precision
    from mmfuse.evaluate import unknown_words, write_answers

    if not args.predictions:
        raise UsageError("predict --data needs --predictions OUT.jsonl")
    task = tasks.for_model(model)
    split = load_split(args.data, args.split, **task.load_options(model), require_answers=False,
                       storage=_image_storage(args, Path(args.checkpoint)))
    unknown = unknown_words(model, split.questions)
    if unknown:
        log.warning("%d question words were never seen in training and are read as unknown: %s%s", len(unknown),
                    ", ".join(repr(w) for w in unknown[:10]), " ..." if len(unknown) > 10 else "")
    device = next(model.parameters()).device
    result = task.evaluate(model, split, device=device, precision=resolve_precision(args.precision, device))
    write_answers(result, args.predictions)
    print(f"wrote {len(split)} predictions to {args.predictions}")
    return 0


def _predict_class(model: Any, args: argparse.Namespace) -> int:
    """``predict`` for an image classifier: the image's class given its context (if the model reads one)."""
    from mmfuse.data import load_image

    kind = model.config.context
    flags = {"text": ("--context", args.context), "image": ("--context-image", args.context_image),
             "question": ("--question", args.question)}
    if kind != "none" and flags[kind][1] is None:
        raise UsageError(f"{args.checkpoint} reads a {kind} context: pass {flags[kind][0]}")
    extra = [flag for k, (flag, value) in flags.items() if value is not None and k != kind]
    if extra:
        raise UsageError(f"{', '.join(extra)}: not read by this classifier (context {kind!r})")
    device = next(model.parameters()).device
    size = model.config.image_size
    image = load_image(args.image, size)  # (3, S, S) uint8
    context_image = load_image(args.context_image, size) if kind == "image" else None
    if args.attention_map and kind != "none" and model.vgg is not None:
        from mmfuse.classify_report import attention_map

        attention_map(model, image, args.attention_map, context=args.context, context_image=context_image)
    elif args.attention_map:
        raise UsageError(f"{args.checkpoint}: no attention maps, this classifier reads no context")
    probs = model.classify(image[None].to(device), [args.context] if kind == "text" else None,
                           None if context_image is None else context_image[None].to(device))[0].cpu()
    top = probs.topk(min(5, len(probs)))
    names = model.labels.names
    ranked = [(names[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    if args.json:
        print(json.dumps({"image": args.image, "context": args.context, "context_image": args.context_image,
                          "label": ranked[0][0], "top5": ranked}))
    else:
        print(f"{args.image} -> {ranked[0][0]}")
        for name, p in ranked:
            print(f"  {p:6.1%}  {name}")
        if args.attention_map:
            print(f"attention map: {args.attention_map}")
    return 0


def _ablate_classify(args: argparse.Namespace) -> int:
    from mmfuse.ablate import CLASSIFY_VARIANTS, DEFAULT_CLASSIFY_VARIANTS, run_classify_ablation
    from mmfuse.train import TrainConfig

    if args.fusions:
        raise UsageError("--fusions compares VQA fusions; with --task classify use --variants")
    variants = ([v.strip() for v in args.variants.split(",") if v.strip()] if args.variants
                else list(DEFAULT_CLASSIFY_VARIANTS))
    unknown = [v for v in variants if v not in CLASSIFY_VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant(s) {unknown}; choose from {list(CLASSIFY_VARIANTS)}")
    given = {k: getattr(args, k) for k in ("images_per_batch", "lr", "threads") if getattr(args, k) is not None}
    base: dict[str, Any] = {"device": args.device, **({"precision": args.precision} if args.precision else {}),
                            **(apply_preset(args.preset, given, {})[0] if args.preset else given),
                            **_storage_options(args)}
    base["model"] = {k: getattr(args, k) for k in ("width", "image_size") if getattr(args, k) is not None}
    epochs = args.epochs if args.epochs is not None else TrainConfig.__dataclass_fields__["epochs"].default
    run_classify_ablation(data=args.data, variants=variants, epochs=epochs, seed=args.seed, out_dir=args.out,
                          base=base, progress=False if args.no_progress else None)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    return 0


def _predict_caption(model: Any, args: argparse.Namespace) -> int:
    import torch

    from mmfuse.data import load_image

    device = next(model.parameters()).device
    image = load_image(args.image, model.config.image_size)  # (3, S, S) uint8
    options = {k: getattr(args, k) for k in ("strategy", "num_beams", "max_new_tokens") if getattr(args, k)}
    if options.get("strategy") == "sample":
        options.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       generator=torch.Generator(device=device).manual_seed(args.seed))
    options["length_penalty"] = args.length_penalty
    questions = None if args.question is None else [args.question]
    texts, out = model.generate(image[None].to(device), questions, need_weights=bool(args.attention_map), **options)
    if args.attention_map:
        from mmfuse.caption_figures import plot_word_attention

        plot_word_attention(model, image, out.tokens[0].tolist(), out.attention[0].cpu(), args.attention_map)
    if args.json:
        print(json.dumps({"image": args.image, **({"question": args.question} if questions else {}),
                          "prediction": texts[0]}))
    else:
        print(texts[0])
    if args.attention_map:
        print(f"attention map: {args.attention_map}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from mmfuse.ablate import DEFAULT_FUSIONS, run_ablation

    if args.task == "classify":
        return _ablate_classify(args)
    vqa_only = [f for f, v in (("--variants", args.variants), ("--preset", args.preset), ("--width", args.width),
                               ("--image-size", args.image_size), ("--images-per-batch", args.images_per_batch),
                               ("--lr", args.lr), ("--threads", args.threads)) if v is not None]
    if vqa_only:
        raise UsageError(f"{', '.join(vqa_only)}: only with --task classify")

    fusions = [f.strip() for f in args.fusions.split(",") if f.strip()] if args.fusions else list(DEFAULT_FUSIONS)
    unknown = [f for f in fusions if f not in fusion_registry.available()]
    if unknown:
        raise UsageError(f"unknown fusion(s) {unknown}; choose from {fusion_registry.available()}")
    from mmfuse.train import TrainConfig

    epochs = args.epochs if args.epochs is not None else TrainConfig.__dataclass_fields__["epochs"].default
    base = {"device": args.device, **({"precision": args.precision} if args.precision else {}),
            **_storage_options(args)}
    run_ablation(data=args.data, fusions=fusions, epochs=epochs, seed=args.seed, out_dir=args.out, base=base,
                 progress=False if args.no_progress else None)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    return 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    sizes = {k: v for k, v in (("num_train_images", args.train_images), ("num_test_images", args.test_images),
                               ("image_size", args.image_size)) if v is not None}
    if args.kind == "captions":
        from mmfuse.data.captions import write_caption_dataset

        if sizes.pop("image_size", None) is not None:
            raise UsageError("--image-size: caption scenes vary their canvas (64-112 px); not with captions")
        root = write_caption_dataset(args.out, max_objects=args.objects, seed=args.seed,
                                     **{"num_train_images": 8000, **sizes})
        print(f"wrote {root} (train.jsonl, test.jsonl, images/); train on it with: "
              f"mmfuse train --task caption --data {root}")
        return 0
    if args.kind == "context":
        from mmfuse.data.context_shapes import write_context_dataset

        root = write_context_dataset(args.out, num_objects=args.objects, context=args.context, label=args.label,
                                     seed=args.seed, **sizes)
        print(f"wrote {root} (train.jsonl, test.jsonl, images/); train on it with: "
              f"mmfuse train --task classify --data {root}")
        return 0
    if args.kind == "sort-of-clevr":
        from mmfuse.data.sort_of_clevr import write_sort_of_clevr

        root = write_sort_of_clevr(args.out, object_radius=args.object_radius, seed=args.seed,
                                   background=args.background, **sizes)
    else:
        from mmfuse.data.relational import write_relational_dataset

        root = write_relational_dataset(args.out, num_objects=args.objects, seed=args.seed, **sizes)
    print(f"wrote {root} (train.jsonl, test.jsonl, images/); train on it with: mmfuse train --data {root}")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from mmfuse.robustness import run_robustness

    data = args.data or _run_data(Path(args.checkpoint[0]))
    storage = _image_storage(args, Path(args.checkpoint[0]))
    if _is_classifier_run(Path(args.checkpoint[0])):
        from mmfuse.classify_report import run_robustness as run_classify_robustness

        if args.limit is not None:
            raise UsageError("--limit applies to VQA models only")
        path = run_classify_robustness(args.checkpoint, data=data, split=args.split, out_dir=args.out,
                                       seed=args.seed, device=args.device, storage=storage)
        print(Path(path).read_text(encoding="utf-8"))
        return 0
    path = run_robustness(args.checkpoint, data=data, split=args.split, out_dir=args.out, limit=args.limit,
                          seed=args.seed, device=args.device, storage=storage)
    print(Path(path).read_text(encoding="utf-8"))
    return 0


def _checkpoint_dir(path: str) -> Path:
    run = Path(path)
    if not (run / "config.json").is_file():
        raise UsageError(f"{run}: not a checkpoint directory (no config.json); pass a run directory of mmfuse train")
    return run


def cmd_serve(args: argparse.Namespace) -> int:
    from mmfuse.serve import ServeConfig, run_server

    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_bytes=args.max_upload_bytes,
                         max_pixels=args.max_pixels, threads=args.threads, device=args.device)
    run_server(_checkpoint_dir(args.checkpoint), config, host=args.host, port=args.port)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmfuse.export import export
    from mmfuse.models import VQAModel

    run = _checkpoint_dir(args.checkpoint)
    model = _load_model(run, "cpu")
    if not isinstance(model, VQAModel):
        raise UsageError(f"{run}: export writes VQA models, this is a {model.model_type} model")
    path = export(model, args.out, args.format)
    print(f"wrote {path} and {path}.json (vocabulary, answers, input names)")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "ablate": cmd_ablate,
            "make-dataset": cmd_make_dataset, "robustness": cmd_robustness, "serve": cmd_serve, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from mmfuse.train import TrainingDiverged

    try:
        return COMMANDS[args.command](args)
    # DataError, CheckpointError and RunDirError are ValueErrors, as are settings a config's checks reject;
    # OSError: a path that is a folder, a full disk (WriteError names the file), a permission.
    except (UsageError, ValueError, OSError, TrainingDiverged) as e:
        parser.exit(2, f"mmfuse: error: {_one_line(e)}\n")
    except RecursionError:
        parser.exit(2, "mmfuse: error: an input file nests too deeply to read (JSON nested thousands of levels?)\n")
    except KeyboardInterrupt:
        parser.exit(130, "mmfuse: interrupted\n")
    except Exception as e:
        # Not the user's doing: one line saying so first, then the traceback for the bug report.
        print(f"mmfuse: internal error: {type(e).__name__}: {_one_line(e)} (a bug in mmfuse; the traceback "
              "follows)", file=sys.stderr)
        raise


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
