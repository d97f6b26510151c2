"""Training: one loop for every task, on any device, in any precision, resumable to the bit.

:class:`TrainConfig` holds a run's settings; :class:`Trainer` builds the task's data and model from it and
runs (or resumes) the loop. The task (:mod:`mmfuse.tasks`) says how batches are made and scored; the
trainer owns the optimiser, the schedule, precision, device, checkpoints and progress. What a run
directory holds, and how it is written so that nothing is lost, is :mod:`mmfuse.runs`.

Given the same seed, thread count and device, a resumed run ends with the same weights as an
uninterrupted one: batches are a pure function of (seed, epoch), and the checkpoint carries every RNG.

Distributed data parallel: run the same command under ``torchrun``; :func:`distributed` (which the CLI
enters) sets up the process group, nccl with one GPU per process on CUDA and gloo on the CPU. Only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mmfuse import runs, tasks
from mmfuse.data import EASY_VQA, ImageStorage, default_cache_dir
from mmfuse.device import autocast, cpu_bf16_support, default_threads, resolve_device, resolve_precision
from mmfuse.io import CheckpointError, atomic_write_text, check_bounds, dataclass_from_dict, load_checked
from mmfuse.models.base import check_fits_in_memory
from mmfuse.tasks.base import attention_modules

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "distributed", "param_groups", "resume", "train"]

log = logging.getLogger(__name__)

# precision auto on a CPU with bf16 units picks bf16 only when its training step takes under this fraction of
# fp32's (Trainer._choose_precision).
BF16_MIN_GAIN = 0.8

# Kept importable from here: older code reads these names from mmfuse.train.
RUN_CONFIG, STATE_NAME, METRICS_NAME = runs.RUN_CONFIG, runs.STATE_NAME, runs.METRICS_NAME


# Each setting's range (see io.check_bounds); lr, attention_lr_mult and step_gamma must also be > 0.
_BOUNDS = {"epochs": (1, 100_000), "images_per_batch": (1, 1_000_000), "lr": (0, 10), "momentum": (0, 0.999),
           "weight_decay": (0, 10), "warmup_steps": (0, 10_000_000), "step_epochs": (1, 100_000),
           "step_gamma": (0, 1), "attention_lr_mult": (0, 1000), "attention_l2": (0, 1000), "grad_clip": (0, 1e6),
           "label_smoothing": (0, 0.99), "seed": (0, 2**63 - 1), "threads": (0, 4096),
           "checkpoint_every": (0, 10_000_000), "eval_every": (0, 100_000)}


@dataclass
class TrainConfig:
    """Settings of a training run; the model's own settings are in ``model`` (its config's fields)."""

    task: str = "vqa"
    data: str = EASY_VQA
    out: str = "runs/latest"
    epochs: int = 10
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
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    bf16: bool = False  # the older spelling of precision="bf16"
    compile: bool = False  # torch.compile the model's forward
    seed: int = 0
    threads: int = 0  # CPU intra-op threads; 0: the cores not already busy (mmfuse.device.default_threads)
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: only at epoch ends)
    eval_split: str = "test"
    eval_every: int = 0  # evaluate every N epochs (and always after the last); 0: only after the last
    # where decoded images live: memory, a memory-mapped .npy in $MMFUSE_CACHE/images (disk), or auto: disk
    # for a split whose decoded images exceed image_memory_gb GiB (mmfuse.data.storage)
    image_storage: Literal["auto", "memory", "disk"] = "auto"
    image_memory_gb: float = 2.0
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    model: dict[str, Any] = field(default_factory=dict)  # the model config's fields (sizes from data derived)

    def __post_init__(self) -> None:
        if self.task not in tasks.available():
            raise ValueError(f"task must be one of {tasks.available()}, got {self.task!r}")
        check_bounds(self, _BOUNDS)
        if not 0 < self.lr <= 10 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be in (0, 10], got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if not self.attention_lr_mult > 0:
            raise ValueError(f"attention_lr_mult must be positive, got {self.attention_lr_mult}")
        if not 0 < self.step_gamma:
            raise ValueError(f"step_gamma must be in (0, 1], got {self.step_gamma}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        self.storage  # noqa: B018 - raises for an unknown image_storage or a bad image_memory_gb
        if self.bf16:  # the alias wins over the default, and must not contradict an explicit choice
            if self.precision not in ("auto", "bf16"):
                raise ValueError(f"bf16=True contradicts precision={self.precision!r}")
            self.precision, self.bf16 = "bf16", False

    @property
    def storage(self) -> ImageStorage:
        """Where the run's decoded images live (``image_storage``, ``image_memory_gb``)."""
        return ImageStorage(self.image_storage, self.image_memory_gb)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d, "training settings")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint (if one was written) is kept."""


# --------------------------------------------------------------------------------------------------
# distributed: set up and torn down by the entry point; the Trainer only reads rank and world size


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def process_device(spec: str = "auto") -> torch.device:
    """The device of this process: ``spec`` resolved, and under torchrun on CUDA the ``LOCAL_RANK``-th GPU."""
    device = resolve_device(spec)
    _, world, local_rank = _dist_env()
    if world > 1 and device.type == "cuda" and ":" not in spec:
        device = torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[tuple[int, int]]:
    """Under torchrun (``WORLD_SIZE`` > 1): a process group (nccl on CUDA, gloo otherwise) for the block.

    Yields ``(rank, world_size)``; without torchrun it yields ``(0, 1)`` and does nothing.
    """
    rank, world, _ = _dist_env()
    if world == 1 or dist.is_initialized():
        yield rank, world
        return
    resolved = process_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# optimisation

_DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Four groups: {attention, other} x {decayed, not decayed}; attention gets ``attention_lr_mult``.

    Weight decay applies to exactly the ``weight`` of linear, convolution and token-embedding layers.
    Everything else is exempt: biases, norms, and parameters a module owns directly (positional and
    modality embeddings, latent queries, residual gates, low-rank sequence projections).
    """
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, _DECAYED)}
    attention_ids = {id(p) for m in attention_modules(model) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in attention_ids, id(p) in decayed), []).append(p)
    return [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
             "lr_mult": cfg.attention_lr_mult if is_attention else 1.0}
            for (is_attention, decay), params in sorted(groups.items())]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    # The fused kernel updates every parameter in one pass: 0.6-0.9 ms a step against 2.9-3.3 ms for foreach
    # on the default VQA model (2-core CPU). It exists for CPU and CUDA tensors.
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), **({"fused": True} if fused else {"foreach": True}))


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
    """Builds the task's data and model from a :class:`TrainConfig` and runs (or resumes) the loop.

    ``device`` overrides ``cfg.device``; ``train_split`` / ``eval_split`` may be given already loaded
    (ablations, tests), else ``cfg.data`` is loaded.
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, device: str | torch.device | None = None,
                 train_split: Any = None, eval_split: Any = None, overwrite: bool = False,
                 allow_data_change: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.rank, self.world, _ = _dist_env()
        if self.world > 1 and not dist.is_initialized():
            raise RuntimeError("under torchrun, train inside `with mmfuse.train.distributed(device):` "
                               "(the mmfuse command does this)")
        self.device = process_device(str(device) if device is not None else cfg.device)
        self.task = tasks.create(cfg.task, label_smoothing=cfg.label_smoothing, attention_l2=cfg.attention_l2)
        if Path(cfg.data).is_dir():  # run.json then finds the data from any working directory
            cfg.data = str(Path(cfg.data).resolve())
        self._lock: runs.RunLock | None = None
        if self.rank == 0:
            self._lock = runs.RunLock(self.out)
        try:
            if self.rank == 0 and not resume:
                runs.check_new_run_dir(self.out, overwrite=overwrite)
            self._build(resume, train_split, eval_split, allow_data_change)
        except BaseException:
            self.close()  # a failed start leaves the run directory free for the next try
            raise

    def _build(self, resume: bool, train_split: Any, eval_split: Any, allow_data_change: bool) -> None:
        cfg = self.cfg
        state = runs.read_state(self.out, ("position", "param_groups")) if resume else None
        self.fingerprint = runs.data_fingerprint(cfg.data) if train_split is None else None
        if state is not None:
            self._check_same_data(state[1].get("data_fingerprint"), allow_data_change)
        torch.manual_seed(cfg.seed)

        self.train_split = train_split if train_split is not None else self.task.load_split(
            cfg.data, "train", **self.task.load_options(cfg.model), progress=cfg.progress, storage=cfg.storage)
        self.threads = self._set_threads(state[1].get("threads") if state else None)
        if resume:
            self.model = self.task.load_model(self.out, device=self.device).train()
        else:
            check_fits_in_memory(lambda: self.task.build_model(cfg.model, self.train_split), copies=4,
                                 what="training this model (weights, gradients, two AdamW moments)")
            self.model = self.task.build_model(cfg.model, self.train_split).to(self.device)
        # Every split the run uses is read before the first step: a broken test split fails now, not
        # after the last epoch.
        self.eval_split = eval_split
        if self.eval_split is None and self.rank == 0:
            self.eval_split = self._load_eval_split()
        if self.rank == 0 and not resume:
            runs.write_run_config(self.out, cfg.to_dict())
        self.batches = self.task.batches(self.model, self.train_split, batch_size=cfg.images_per_batch,
                                         seed=cfg.seed, rank=self.rank, world_size=self.world)
        self.forward_model: nn.Module = self.model
        if self.world > 1:
            # static_graph: the same parameters take part in every step, so DDP finds the ones a fusion
            # never uses (text_only, image_only) once, without a warning or a search on every step.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, static_graph=True)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.optimizer = make_optimizer(self.model, cfg)
        saved = state[1].get("precision") if state else None
        # A resumed run keeps its precision, on whatever device it continues (fp16 needs a GPU).
        self.precision = resolve_precision(saved, self.device) if saved else self._choose_precision()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # Reading the loss on the host waits for the device: on CPU that is free, on a GPU it is done
        # every few steps only (the NaN check and the progress bar then see a window of steps).
        self.sync_every = 1 if self.device.type == "cpu" else 25
        self.pos = _Position()
        if state is not None:
            self._load_state(*state)

    # ------------------------------------------------------------------------------------------
    def _check_same_data(self, saved: str | None, allow_change: bool) -> None:
        if saved is None or self.fingerprint is None or saved == self.fingerprint:
            return
        message = (f"{self.cfg.data}: the dataset changed since this run was checkpointed (fingerprint "
                   f"{saved} -> {self.fingerprint})")
        if not allow_change:
            raise runs.RunDirError(f"{message}; resume it anyway with --allow-data-change")
        log.warning("%s; resuming anyway", message)

    def _set_threads(self, saved: int | None) -> int:
        if self.device.type != "cpu":
            return torch.get_num_threads()
        threads = self.cfg.threads or saved or 0
        if not threads:
            threads = default_threads()
            if self.world > 1:  # processes share the cores; oversubscribed OpenMP threads spin and crawl
                threads = max(1, threads // self.world)
            if threads < (os.cpu_count() or 1) and self.world == 1:
                log.info("using %d CPU thread(s): other work keeps the other cores busy; --threads N to choose",
                         threads)
        torch.set_num_threads(threads)
        return threads

    def _choose_precision(self) -> str:
        """``cfg.precision`` resolved; for ``auto`` on a CPU with native bf16, the faster of fp32 and bf16.

        Native bf16 units do not make every model faster (small matrices, autocast's casts), so the first
        run of a model on such a CPU times a few real steps both ways and keeps the faster: ``auto`` is never
        slower than fp32. The choice is remembered per CPU, thread count and model settings
        (``$MMFUSE_CACHE/precision.json``), so later runs of the same command choose alike and repeat exactly.
        """
        precision = resolve_precision(self.cfg.precision, self.device)
        if (self.cfg.precision != "auto" or self.device.type != "cpu" or cpu_bf16_support() == "none"
                or self.world > 1):  # ranks must agree, and each would time its own steps
            return precision
        key = json.dumps([_cpu_name(), torch.__version__, self.threads, self.cfg.task, self.cfg.images_per_batch,
                          self.model.config.to_dict() if hasattr(self.model, "config") else None], sort_keys=True)
        key = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache = default_cache_dir() / "precision.json"
        try:
            known = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        if known.get(key) in ("fp32", "bf16"):
            log.info("precision auto: %s (measured earlier on this CPU for this model, %s)", known[key], cache)
            return known[key]
        timings = self._time_steps(("fp32", "bf16"))
        # bf16 rounds the activations and gradients: worth it for a clear gain only (the default easy-VQA run
        # at equal speed ended at 99.06% in bf16 against 99.95% in fp32, README "Results").
        chosen = "bf16" if timings["bf16"] < BF16_MIN_GAIN * timings["fp32"] else "fp32"
        log.info("precision auto: %s (a training step took %.1f ms in fp32, %.1f ms in bf16 on this CPU; bf16 "
                 "is chosen when it takes under %.0f%% of fp32's time)",
                 chosen, 1e3 * timings["fp32"], 1e3 * timings["bf16"], 100 * BF16_MIN_GAIN)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps({**known, key: chosen}, indent=1) + "\n")
        except OSError as e:  # a read-only home: measure again next time
            log.debug("precision choice not cached: %s", e)
        return chosen

    def _time_steps(self, precisions: Sequence[str], batches: int = 6) -> dict[str, float]:
        """Median seconds of a forward+backward in each precision, over the first ``batches`` batches; leaves
        weights, grads and RNG as they were.

        Distinct batches, as training sees them (one batch timed again and again favoured bf16 by 20% on a
        CPU where whole epochs took the same time), and the precisions interleaved batch by batch, so that
        a machine that slows down or speeds up meanwhile weighs on both alike.
        """
        weights = copy.deepcopy(self.model.state_dict())
        rng = torch.get_rng_state()
        loader = iter(self.batches.epoch(0))
        times: dict[str, list[float]] = {p: [] for p in precisions}
        for _ in range(batches + 1):  # the first batch warms up
            batch = next(loader, None)
            if batch is None:
                break
            batch = self._to_device(batch)
            for precision in precisions:
                t0 = time.perf_counter()
                with autocast(self.device, precision):
                    out = self.task.step(self.model, batch)
                out.loss.backward()
                times[precision].append(time.perf_counter() - t0)
                self.model.zero_grad(set_to_none=True)
        self.model.load_state_dict(weights)
        torch.set_rng_state(rng)
        # the warm-up batch's times left out, unless the split has no other batch
        return {p: statistics.median(t[1:] or t) for p, t in times.items()}

    def _to_device(self, batch: Any) -> Any:
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device) if self.device.type != "cpu" else batch

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, pending_row: dict[str, Any] | None = None) -> None:
        """Model files + training state, each file atomically; the state file is written last.

        ``pending_row`` is the metrics row of the epoch this checkpoint ends, kept in the state until it is
        in ``metrics.jsonl``: a run killed in between writes it on resume.
        """
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(self.out)
        opt = self.optimizer.state_dict()
        tensors = runs.rng_state()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        meta = {"position": dataclasses.asdict(self.pos), "param_groups": opt["param_groups"],
                "precision": self.precision, "threads": self.threads, "world_size": self.world,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "data_fingerprint": self.fingerprint, "pending_row": pending_row}
        runs.write_state(self.out, tensors, meta)

    def _load_state(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        path = self.out / runs.STATE_NAME
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        load_checked(self.model, model_state, path)
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        try:
            # load_state_dict moves the state to each parameter's device: a CPU checkpoint resumes on a GPU
            self.optimizer.load_state_dict({"state": state, "param_groups": meta.get("param_groups")})
            self.pos = _Position(**meta["position"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: the training state does not fit the model ({e})") from e
        saved_world = meta.get("world_size", 1)
        if self.pos.step_in_epoch and saved_world != self.world:
            raise CheckpointError(
                f"{path}: checkpointed mid-epoch with {saved_world} process(es); resume with {saved_world} "
                f"(the batches of an epoch depend on the process count), or from an epoch-end checkpoint")
        if meta.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["scaler"])
        runs.set_rng_state(tensors)
        if self.rank == 0:
            runs.remove_temp_files(self.out)
            rows = runs.truncate_metrics(self.out, self.pos.epoch)
            pending = meta.get("pending_row")
            if pending and not self.pos.step_in_epoch and (not rows or rows[-1]["epoch"] < pending["epoch"]):
                self._finish_row(pending)  # killed after the epoch's checkpoint, before its row
        log.info("resuming %s at epoch %d, step %d", self.out, self.pos.epoch + 1, self.pos.step_in_epoch)

    # ------------------------------------------------------------------------------------------
    def _set_lr(self) -> None:
        f = lr_factor(self.cfg, self.pos.global_step, len(self.batches))
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.lr * g["lr_mult"] * f

    def train_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimiser step on ``batch`` (on the device); returns (loss, correct, count), the first two as
        0-d tensors on the device."""
        cfg = self.cfg
        self._set_lr()
        with autocast(self.device, self.precision):
            out = self.task.step(self.forward_model, batch)
        extra = self.task.regularizer(self.model)
        total = out.loss if extra is None else out.loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total.detach(), out.correct.detach(), out.count

    def _load_eval_split(self) -> Any:
        """The run's ``eval_split``, decoded the way the model takes images."""
        cfg = self.cfg
        return self.task.load_split(cfg.data, cfg.eval_split, **self.task.load_options(self.model),
                                    progress=cfg.progress, storage=cfg.storage)

    def evaluate(self) -> dict[str, Any]:
        if self.eval_split is None:
            self.eval_split = self._load_eval_split()
        return self.task.evaluate(self.model, self.eval_split, device=self.device,
                                  precision=self.precision).summary()

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        last: dict[str, Any] = {}
        try:
            while self.pos.epoch < cfg.epochs:
                last = self._train_epoch()
            if self.world > 1:
                dist.barrier()
        finally:
            self.close()
        return last

    def close(self) -> None:
        """Release the run directory (``fit`` does this when it ends)."""
        if self._lock is not None:
            self._lock.release()

    def _check_finite(self, loss: torch.Tensor, first_step: int) -> None:
        """Raise :class:`TrainingDiverged` if the summed loss of global steps ``first_step``.. is not finite."""
        if not torch.isfinite(loss):
            last = self.pos.step_in_epoch
            first = last - (self.pos.global_step - first_step)
            steps = f"step {last}" if first == last else f"steps {first}-{last}"
            kept = (f"the last good checkpoint in {self.out} is kept" if (self.out / runs.STATE_NAME).is_file()
                    else "no checkpoint was written yet")
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {self.pos.epoch + 1}, {steps} (global step "
                                   f"{self.pos.global_step}); {kept}")

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
        # Sums of the steps since the last sync, on the device (float64: the order of additions is fixed).
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        correct_acc = torch.zeros((), dtype=torch.long, device=self.device)
        window_start = pos.global_step + 1
        for batch in bar:
            loss, correct, n = self.train_step(self._to_device(batch))
            loss_acc += loss.double() * n
            correct_acc += correct
            pos.seen += n
            pos.step_in_epoch += 1
            pos.global_step += 1
            last_step = pos.step_in_epoch == len(self.batches)
            checkpoint = (cfg.checkpoint_every and pos.global_step % cfg.checkpoint_every == 0 and not last_step)
            if checkpoint or last_step or pos.global_step % self.sync_every == 0:
                self._check_finite(loss_acc, window_start)
                pos.loss_sum += float(loss_acc)
                pos.correct += int(correct_acc)
                loss_acc.zero_()
                correct_acc.zero_()
                window_start = pos.global_step + 1
                bar.set_postfix(loss=f"{pos.loss_sum / pos.seen:.3f}", acc=f"{pos.correct / pos.seen:.3f}",
                                qps=f"{(pos.seen - done_before) / (time.perf_counter() - t0):.0f}", refresh=False)
            if checkpoint:
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - t0
        loss_sum, correct, seen = self._all_ranks_sum(pos.loss_sum, pos.correct, pos.seen)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": pos.global_step, "train_loss": loss_sum / max(seen, 1),
                               "train_accuracy": correct / max(seen, 1), "seconds": seconds,
                               "questions_per_second": (seen - done_before * self.world) / seconds}
        self.pos = _Position(epoch + 1, 0, pos.global_step)
        # The checkpoint comes first, holding the row until it is in metrics.jsonl: a kill (or a broken
        # evaluation) after it loses neither the epoch nor its row.
        self.save_checkpoint(pending_row=row)
        if self.rank == 0:
            row = self._finish_row(row)
            log.info("epoch %d/%d %s", epoch + 1, cfg.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        return row

    def _finish_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Evaluate if ``row``'s epoch is one to evaluate, and append the row to metrics.jsonl."""
        cfg, epoch = self.cfg, row["epoch"]
        if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
            row = {**row, **{f"{cfg.eval_split}_{k}": v for k, v in self.evaluate().items()}}
        runs.append_metrics(self.out, row)
        return row

    def _all_ranks_sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def train(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """Train from scratch into ``cfg.out``; returns the last epoch's metrics (kwargs: see :class:`Trainer`)."""
    return Trainer(cfg, **kwargs).fit()


def resume(run_dir: str | os.PathLike, *, device: str | torch.device | None = None, allow_data_change: bool = False,
           **overrides: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its own settings (``overrides``: e.g. progress).

    A dataset that changed since the run was checkpointed is refused unless ``allow_data_change``."""
    if Path(run_dir).is_dir():  # another process's run: say so, rather than what its files lack yet
        runs.RunLock(run_dir).release()
    d = runs.read_run_config(run_dir)
    d.update(overrides, out=str(run_dir))
    try:
        cfg = TrainConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(run_dir) / runs.RUN_CONFIG}: {e}") from e
    return Trainer(cfg, resume=True, device=device, allow_data_change=allow_data_change).fit()
