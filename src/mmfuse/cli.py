"""The ``mmfuse`` command: train, evaluate, predict, ablate, robustness.

Every command prints its result; errors in the user's input (a bad argument, a dataset line, a
checkpoint file) end with one line ``mmfuse: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mmfuse import fusion as fusion_registry
from mmfuse.attention import IMPLS
from mmfuse.presets import PRESETS, apply_preset

__all__ = ["main"]

log = logging.getLogger("mmfuse")


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="easy-vqa",
                   help="'easy-vqa' (built in) or a directory with train.jsonl and test.jsonl (default: easy-vqa)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--fusion", choices=fusion_registry.available(), help="fusion by name")
    g.add_argument("--vision", choices=["cnn", "vgg11", "vgg16"], help="vision encoder")
    g.add_argument("--vgg-width", type=float, help="channel multiplier of VGG (1.0 = the original widths)")
    g.add_argument("--pool-queries", type=int, help="pool the image tokens to this many latents first (0: off)")
    g.add_argument("--text", choices=["transformer", "hf"], help="own small transformer, or a Hugging Face model")
    g.add_argument("--hf-path", help="folder of a Hugging Face model (default with --text hf: the bundled MiniLM)")
    g.add_argument("--hf-finetune", action="store_true", help="train the Hugging Face encoder too (default: frozen)")
    g.add_argument("--dim", type=int, help="fusion width")
    g.add_argument("--depth", type=int, help="fusion blocks")
    g.add_argument("--num-heads", type=int, help="attention heads")
    g.add_argument("--dropout", type=float)
    g.add_argument("--impl", choices=list(IMPLS), help="attention implementation")
    g.add_argument("--image-size", type=int, help="images are resized to this square size")
    g.add_argument("--fusion-options", type=_json_object, metavar="JSON",
                   help='extra arguments of the fusion, e.g. \'{"image_depth": 0}\' (replaces a preset\'s)')


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("fusion", "vision", "vgg_width", "pool_queries", "text", "hf_path", "dim", "depth", "num_heads",
             "dropout", "impl", "image_size", "fusion_options")  # flags named as the VQAConfig fields they set
    options = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "hf_finetune", False):
        options["hf_freeze"] = False
    if options.get("text") == "hf" and "hf_path" not in options:
        from mmfuse.encoders.hf import default_hf_model_path

        options["hf_path"] = str(default_hf_model_path())
    return options


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--images-per-batch", type=int, help="images per step; each brings all of its questions")
    g.add_argument("--optimizer", choices=["adamw", "sgd"])
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=["cosine", "step", "constant"])
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--step-epochs", type=int, help="StepLR: decay every N epochs")
    g.add_argument("--step-gamma", type=float, help="StepLR: decay factor")
    g.add_argument("--attention-lr-mult", type=float, help="learning-rate multiplier for attention layers")
    g.add_argument("--attention-l2", type=float, help="L2 penalty on attention projection weights")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    g.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps within an epoch")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (0: only at the end)")


_TRAIN_FIELDS = ("epochs", "seed", "images_per_batch", "optimizer", "lr", "momentum", "weight_decay", "schedule",
                 "warmup_steps", "step_epochs", "step_gamma", "attention_lr_mult", "attention_l2", "grad_clip",
                 "label_smoothing", "bf16", "threads", "checkpoint_every", "eval_every")


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    return {f: getattr(args, f) for f in _TRAIN_FIELDS if getattr(args, f, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmfuse", description="Attention-based fusion of images and text.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a VQA model (default: easy-VQA, the default model)")
    _add_data(p)
    p.add_argument("--out", help="run directory (default: runs/<fusion>-seed<seed>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run with its own settings")
    p.add_argument("--report", action="store_true", help="write RUN_DIR/report.md after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a named recipe (sort-of-clevr); explicit flags override it")
    _add_model_args(p)
    _add_train_args(p)

    p = sub.add_parser("evaluate", help="accuracy of a trained model on a split")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    p.add_argument("--data", help="dataset (default: the one the model was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--predictions", metavar="FILE.jsonl", help="write one JSON line per question")
    p.add_argument("--confusion", metavar="FILE.png", help="write the confusion matrix")
    p.add_argument("--bf16", action="store_true")

    p = sub.add_parser("predict", help="answer one question about one image")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    p.add_argument("--image", required=True, metavar="PATH")
    p.add_argument("--question", required=True, metavar="TEXT")
    p.add_argument("--attention-map", metavar="OUT.png", help="write the attention over the image")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("ablate", help="train several fusions with the same budget and tabulate them")
    _add_data(p)
    p.add_argument("--fusions", help="comma-separated fusion names (default: a representative set)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fusion (default: the training default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("make-dataset", help="write a synthetic dataset as a JSONL directory")
    p.add_argument("kind", choices=["relational", "sort-of-clevr"],
                   help="relational: several shapes per image, questions about their spatial relations; "
                        "sort-of-clevr: the benchmark of Santoro et al. 2017 (six objects, 75 px)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--train-images", type=int, help="default: 4000 (relational), 9800 (sort-of-clevr)")
    p.add_argument("--test-images", type=int, help="default: 1000 (relational), 200 (sort-of-clevr)")
    p.add_argument("--image-size", type=int, help="default: 64 (relational), 75 (sort-of-clevr)")
    p.add_argument("--objects", type=int, default=4, help="objects per image (relational)")
    p.add_argument("--object-radius", type=int, default=5, help="half the object width in pixels (sort-of-clevr)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("robustness", help="accuracy under image and text perturbations")
    p.add_argument("--checkpoint", required=True, action="append", metavar="RUN_DIR",
                   help="a trained run (repeat to compare several)")
    p.add_argument("--data", help="dataset (default: the one the first model was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="runs/robustness")
    p.add_argument("--limit", type=int, help="evaluate only the first N images' questions")
    p.add_argument("--seed", type=int, default=0)
    return parser


# --------------------------------------------------------------------------------------------------


def _run_data(run_dir: Path) -> str:
    from mmfuse.io import read_json
    from mmfuse.train import RUN_CONFIG

    try:
        return read_json(run_dir / RUN_CONFIG)["data"]
    except (ValueError, KeyError) as e:  # read_json's CheckpointError is a ValueError
        raise UsageError(f"{run_dir}: no {RUN_CONFIG} with the training data; pass --data") from e


def cmd_train(args: argparse.Namespace) -> int:
    from mmfuse.train import TrainConfig, Trainer, resume

    progress = False if args.no_progress else None
    if args.resume:
        given = [f for f in (*_TRAIN_FIELDS, "fusion", "vision", "dim", "depth", "preset")
                 if getattr(args, f, None) is not None]
        if given:
            flags = ", ".join("--" + g.replace("_", "-") for g in given)
            raise UsageError(f"--resume continues a run with its own settings; drop {flags}")
        result = resume(args.resume, progress=progress)
        out = Path(args.resume)
    else:
        model = _model_options(args)
        options = _train_options(args)
        if args.preset:
            options, model = apply_preset(args.preset, options, model)
        from mmfuse.models import VQAConfig

        fusion = model.get("fusion", VQAConfig.__dataclass_fields__["fusion"].default)
        out = Path(args.out or f"runs/{fusion}-seed{options.get('seed', 0)}")
        cfg = TrainConfig(data=args.data, out=str(out), progress=progress, model=model, **options)
        result = Trainer(cfg).fit()
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=None))
    print(f"model saved in {out}")
    if args.report:
        from mmfuse.report import write_report

        print(f"report: {write_report(out)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmfuse.data import load_split
    from mmfuse.evaluate import evaluate, write_predictions
    from mmfuse.models import VQAModel

    run = Path(args.checkpoint)
    model = VQAModel.from_pretrained(run)
    data = args.data or _run_data(run)
    split = load_split(data, args.split, image_size=model.config.image_size)
    result = evaluate(model, split, bf16=args.bf16)
    summary = result.summary()
    if args.predictions:
        write_predictions(result, args.predictions)
    if args.confusion:
        from mmfuse.report import plot_confusion

        plot_confusion(result, args.confusion)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{split.name}: accuracy {summary['accuracy']:.4f} on {summary['num_examples']} questions")
        for value in summary.values():
            if isinstance(value, dict):
                for name, acc in value.items():
                    print(f"  {name:>20s}  {acc:.4f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mmfuse.data import load_image
    from mmfuse.models import VQAModel

    model = VQAModel.from_pretrained(args.checkpoint)
    image = load_image(args.image, model.config.image_size)  # (3, S, S) uint8
    probs = model.answer(image[None], [args.question])[0]
    top = probs.topk(min(5, len(probs)))
    names = model.answers.names
    ranked = [(names[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    if args.attention_map:
        from mmfuse.report import attention_map

        attention_map(model, image, args.question, args.attention_map)
    if args.json:
        print(json.dumps({"question": args.question, "answer": ranked[0][0], "top5": ranked}))
    else:
        print(f"{args.question} -> {ranked[0][0]}")
        for name, p in ranked:
            print(f"  {p:6.1%}  {name}")
    if args.attention_map:
        print(f"attention map: {args.attention_map}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from mmfuse.ablate import DEFAULT_FUSIONS, run_ablation

    fusions = [f.strip() for f in args.fusions.split(",") if f.strip()] if args.fusions else list(DEFAULT_FUSIONS)
    unknown = [f for f in fusions if f not in fusion_registry.available()]
    if unknown:
        raise UsageError(f"unknown fusion(s) {unknown}; choose from {fusion_registry.available()}")
    from mmfuse.train import TrainConfig

    epochs = args.epochs if args.epochs is not None else TrainConfig.__dataclass_fields__["epochs"].default
    run_ablation(data=args.data, fusions=fusions, epochs=epochs, seed=args.seed, out_dir=args.out,
                 progress=False if args.no_progress else None)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    return 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    sizes = {k: v for k, v in (("num_train_images", args.train_images), ("num_test_images", args.test_images),
                               ("image_size", args.image_size)) if v is not None}
    if args.kind == "sort-of-clevr":
        from mmfuse.data.sort_of_clevr import write_sort_of_clevr

        root = write_sort_of_clevr(args.out, object_radius=args.object_radius, seed=args.seed, **sizes)
    else:
        from mmfuse.data.relational import write_relational_dataset

        root = write_relational_dataset(args.out, num_objects=args.objects, seed=args.seed, **sizes)
    print(f"wrote {root} (train.jsonl, test.jsonl, images/); train on it with: mmfuse train --data {root}")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from mmfuse.robustness import run_robustness

    data = args.data or _run_data(Path(args.checkpoint[0]))
    path = run_robustness(args.checkpoint, data=data, split=args.split, out_dir=args.out, limit=args.limit,
                          seed=args.seed)
    print(Path(path).read_text(encoding="utf-8"))
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "ablate": cmd_ablate,
            "make-dataset": cmd_make_dataset, "robustness": cmd_robustness}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    # DataError and CheckpointError are ValueErrors, as are settings rejected by a config's checks.
    except (UsageError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"mmfuse: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "mmfuse: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
