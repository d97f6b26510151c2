"""Training: image-grouped batches, AdamW or SGD, schedules, bf16 autocast, atomic checkpoints, resume, DDP.

A run directory holds::

    run.json                 the TrainConfig (what ``--resume`` restarts with)
    config.json, model.safetensors, vocab.json   the model after the last finished epoch
    state.safetensors        everything needed to continue: weights, optimizer, scheduler, RNG, position
    metrics.jsonl            one line per epoch

Every file is written atomically (a temporary file, then a rename), so a run killed at any moment
leaves either the previous or the new version, never a torn one, and ``--resume`` continues from the
last checkpoint. Given the same seed and thread count, the resumed run ends with the same weights as an
uninterrupted one: batches are a pure function of (seed, epoch), and the checkpoint carries every RNG.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from tqdm import tqdm

from mmfuse.data import EASY_VQA, AnswerVocab, ImageGroupedBatches, VQASplit, WordTokenizer, encode_answers, load_split
from mmfuse.evaluate import evaluate
from mmfuse.io import (
    CheckpointError,
    atomic_write_text,
    dataclass_from_dict,
    load_checked,
    read_json,
    write_safetensors,
)
from mmfuse.layers import CrossAttention
from mmfuse.models.vqa import VQAConfig, VQAModel

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "train"]

log = logging.getLogger(__name__)

RUN_CONFIG, STATE_NAME, METRICS_NAME = "run.json", "state.safetensors", "metrics.jsonl"


@dataclass
class TrainConfig:
    """Settings of a training run; the model's own settings are in ``model`` (see :class:`VQAConfig`)."""

    data: str = EASY_VQA
    out: str = "runs/latest"
    epochs: int = 9
    images_per_batch: int = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.05
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = 100
    step_epochs: int = 3  # StepLR: decay every `step_epochs` epochs by `step_gamma`
    step_gamma: float = 0.1
    attention_lr_mult: float = 1.0  # learning-rate multiplier for the attention layers' parameters
    attention_l2: float = 0.0  # L2 penalty on the attention projections' weights
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    bf16: bool = False
    seed: int = 0
    threads: int = 0  # 0: torch's default
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: only at epoch ends)
    eval_split: str = "test"
    eval_every: int = 0  # evaluate every N epochs (and always after the last); 0: only after the last
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    model: dict[str, Any] = field(default_factory=dict)  # VQAConfig fields (num_answers/vocab_size derived)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {self.images_per_batch}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d, "training settings")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------------
# distributed helpers: one code path, world size 1 without torchrun


def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _init_distributed() -> tuple[int, int]:
    rank, world = _dist_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


# --------------------------------------------------------------------------------------------------


def attention_modules(model: nn.Module) -> Iterator[CrossAttention]:
    return (m for m in model.modules() if isinstance(m, CrossAttention))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Four groups: {attention, other} x {decayed, not decayed}; attention gets ``attention_lr_mult``.

    Weight decay applies to matrices and conv kernels only, not to biases, norms and embeddings' rows
    of positions (nanoGPT's rule: decay tensors with dim >= 2, except embeddings tables of positions).
    """
    attention_ids = {id(p) for m in attention_modules(model) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and "pos" not in name.split(".")[-1] and "latents" not in name
        groups.setdefault((id(p) in attention_ids, decay), []).append(p)
    out = []
    for (is_attention, decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                    "lr_mult": cfg.attention_lr_mult if is_attention else 1.0})
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), foreach=True)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at ``step`` (linear warmup, then the schedule)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps, total // 2)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** ((step // steps_per_epoch) // max(1, cfg.step_epochs))
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def attention_l2(model: nn.Module) -> Tensor:
    """Sum of squared weights of every attention projection (the source documents' L2 tip)."""
    terms = [proj.weight.pow(2).sum() for m in attention_modules(model)
             for proj in (m.q_proj, m.k_proj, m.v_proj, m.out_proj)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


# --------------------------------------------------------------------------------------------------


@dataclass
class _Position:
    """Where the loop is, and the running sums of the epoch in progress (so a resumed epoch reports the
    same training loss and accuracy as an uninterrupted one)."""

    epoch: int = 0  # epoch being trained
    step_in_epoch: int = 0  # batches of that epoch already done
    global_step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0


class Trainer:
    """Builds data, model and optimizer from a :class:`TrainConfig` and runs (or resumes) the loop."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, train_split: VQASplit | None = None,
                 eval_split: VQASplit | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.rank, self.world = _init_distributed()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif self.world > 1:  # processes share the cores; oversubscribed OpenMP threads spin and crawl
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        torch.manual_seed(cfg.seed)

        # Splits may be given already loaded (ablations, tests); else cfg.data is loaded.
        self.train_split = train_split or load_split(cfg.data, "train", image_size=cfg.model.get("image_size", 64),
                                                     progress=cfg.progress)
        if resume:
            self.model = VQAModel.from_pretrained(self.out)
            self.model.train()
        else:
            self.model = self._new_model(self.train_split)
        ids, mask = self.model.tokenize(self.train_split.questions)
        answers = encode_answers(self.train_split.answers, self.model.answers)
        self.batches = ImageGroupedBatches(self.train_split, ids, mask, answers,
                                           images_per_batch=cfg.images_per_batch, seed=cfg.seed,
                                           rank=self.rank, world_size=self.world)
        self.eval_split = eval_split
        # find_unused_parameters: some fusions ignore a modality (text_only, image_only) by design.
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
                    if self.world > 1 else self.model)
        self.optimizer = make_optimizer(self.model, cfg)
        self.pos = _Position()
        if resume:
            self._load_state()

    def _new_model(self, split: VQASplit) -> VQAModel:
        options = dict(self.cfg.model)
        answers = AnswerVocab(split.answers)
        tokenizer = None
        if options.get("text", "transformer") == "transformer":
            tokenizer = WordTokenizer.fit(split.questions)
            options["vocab_size"] = len(tokenizer)
        options.setdefault("image_size", split.image_size)
        config = VQAConfig(num_answers=len(answers), **options)
        return VQAModel(config, answers=answers, tokenizer=tokenizer)

    # ------------------------------------------------------------------------------------------
    def _state_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Optimizer state, RNG and loop position as tensors + JSON metadata (no pickle)."""
        tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        meta = {"position": json.dumps(dataclasses.asdict(self.pos)),
                "param_groups": json.dumps(opt["param_groups"])}
        return tensors, meta

    def save_checkpoint(self) -> None:
        """Model files + training state, each file atomically; the state file is written last."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(self.out)
        tensors, meta = self._state_tensors()
        tensors.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        write_safetensors(self.out / STATE_NAME, tensors, metadata=meta)

    def _load_state(self) -> None:
        if self.rank == 0:
            for tmp in self.out.glob(".*.tmp"):  # half-written files of a killed write
                tmp.unlink(missing_ok=True)
        path = self.out / STATE_NAME
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, nothing to resume")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            position = json.loads(meta["position"])
            groups = json.loads(meta["param_groups"])
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable training state ({e})") from e
        except Exception as e:  # safetensors' own error types for truncated files
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        load_checked(self.model, model_state, path)
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit the model ({e})") from e
        torch.set_rng_state(tensors["rng.torch"])
        self.pos = _Position(**position)
        _truncate_metrics(self.out / METRICS_NAME, self.pos.epoch)
        log.info("resuming %s at epoch %d, step %d", self.out, self.pos.epoch + 1, self.pos.step_in_epoch)

    # ------------------------------------------------------------------------------------------
    def _set_lr(self) -> None:
        f = lr_factor(self.cfg, self.pos.global_step, len(self.batches))
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.lr * g["lr_mult"] * f

    def train_step(self, batch) -> tuple[float, int, int]:
        cfg = self.cfg
        self._set_lr()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = self.ddp(batch.images, batch.tokens, batch.text_mask, batch.image_index)
        loss = F.cross_entropy(logits.float(), batch.answers, ignore_index=-1,
                               label_smoothing=cfg.label_smoothing)
        total = loss + cfg.attention_l2 * attention_l2(self.model) if cfg.attention_l2 else loss
        if not torch.isfinite(total):
            raise TrainingDiverged(
                f"loss is {total.item()} at epoch {self.pos.epoch + 1}, step {self.pos.step_in_epoch + 1} "
                f"(global step {self.pos.global_step + 1}); the last good checkpoint in {self.out} is kept")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        correct = int((logits.argmax(-1) == batch.answers).sum())
        return loss.detach().item(), correct, len(batch)

    def evaluate(self) -> dict[str, Any]:
        if self.eval_split is None:
            self.eval_split = load_split(self.cfg.data, self.cfg.eval_split,
                                         image_size=self.model.config.image_size, progress=self.cfg.progress)
        return evaluate(self.model, self.eval_split, bf16=self.cfg.bf16).summary()

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / RUN_CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
        last: dict[str, Any] = {}
        while self.pos.epoch < cfg.epochs:
            last = self._train_epoch()
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return last

    def _train_epoch(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.pos
        epoch = pos.epoch
        self.model.train()
        t0 = time.perf_counter()
        done_before = pos.seen
        show = False if self.rank != 0 else cfg.progress
        bar = tqdm(self.batches.epoch(epoch, start=pos.step_in_epoch), total=len(self.batches),
                   initial=pos.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=None if show is None else not show, leave=False, unit="batch")
        for batch in bar:
            loss, correct, n = self.train_step(batch)
            pos.loss_sum, pos.correct, pos.seen = pos.loss_sum + loss * n, pos.correct + correct, pos.seen + n
            pos.step_in_epoch += 1
            pos.global_step += 1
            bar.set_postfix(loss=f"{pos.loss_sum / pos.seen:.3f}", acc=f"{pos.correct / pos.seen:.3f}",
                            qps=f"{(pos.seen - done_before) / (time.perf_counter() - t0):.0f}", refresh=False)
            if (cfg.checkpoint_every and pos.global_step % cfg.checkpoint_every == 0
                    and pos.step_in_epoch < len(self.batches)):
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - t0
        loss_sum, correct, seen = self._all_ranks_sum(pos.loss_sum, pos.correct, pos.seen)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": pos.global_step, "train_loss": loss_sum / max(seen, 1),
                               "train_accuracy": correct / max(seen, 1), "seconds": seconds,
                               "questions_per_second": (seen - done_before * self.world) / seconds}
        self.pos = _Position(epoch + 1, 0, pos.global_step)
        is_last = self.pos.epoch == cfg.epochs
        if self.rank == 0 and (is_last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            result = self.evaluate()
            row.update({f"{cfg.eval_split}_{k}": v for k, v in result.items()})
        if self.rank == 0:
            # The row goes first: a kill before the checkpoint lands leaves a row that resume drops
            # (_truncate_metrics) and writes again, whereas the other order could lose it.
            _append_metrics(self.out / METRICS_NAME, row)
        self.save_checkpoint()
        if self.rank == 0:
            log.info("epoch %d/%d %s", epoch + 1, cfg.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        return row

    def _all_ranks_sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep the rows of finished epochs only (a kill may land between the checkpoint and the append)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done]
    atomic_write_text(path, "".join(r + "\n" for r in rows))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train from scratch into ``cfg.out``; returns the last epoch's metrics."""
    return Trainer(cfg).fit()


def resume(run_dir: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its own settings (``overrides``: e.g. progress)."""
    d = read_json(Path(run_dir) / RUN_CONFIG)
    d.update(overrides, out=str(run_dir))
    return Trainer(TrainConfig.from_dict(d), resume=True).fit()


