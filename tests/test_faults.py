"""Faults: training killed with SIGKILL and resumed, tampered checkpoints, missing run directories.

The kill test runs the real command line in subprocesses. A killed process runs no cleanup code, so the
files it leaves are exactly what a power cut or the OOM killer would leave.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mmfuse.runs
import mmfuse.train
from mmfuse.cli import main
from mmfuse.data.vocab import load_vocab
from mmfuse.io import CheckpointError, read_json
from mmfuse.models import VQAModel
from mmfuse.train import TrainConfig, Trainer, resume
from tests.run_checks import assert_same_run, metrics
from tests.tiny_data import make_tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_MODEL = {"cnn_stages": [[8], [16]], "dim": 32, "text_dim": 32, "num_heads": 2, "text_heads": 2,
              "image_size": 32}
# 32 training images, 8 steps an epoch: 16 epochs last several seconds, so the kills land mid-run.
# An explicit precision: with auto, the reference and the killed run would each time fp32 against bf16 on a
# CPU with native bf16, and could choose differently.
TRAIN_ARGS = ["--epochs", "16", "--checkpoint-every", "2", "--threads", "1", "--no-progress", "--seed", "0",
              "--image-size", "32", "--dim", "32", "--num-heads", "2", "--images-per-batch", "4", "--precision", "fp32"]
SIGKILL = -signal.SIGKILL


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmfuse.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == SIGKILL, f"the process was not killed mid-run (exit {proc.returncode})"


def _temporary_files(run: Path) -> list[str]:
    return sorted(n for n in os.listdir(run) if n.endswith(".tmp"))


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _assert_loadable(run: Path) -> None:
    """Every file of the run directory parses and the model loads."""
    for name in ("config.json", "run.json"):
        read_json(run / name)
    load_vocab(run / "vocab.json")
    VQAModel.from_pretrained(run)
    with safe_open(str(run / "state.safetensors"), framework="pt") as f:
        json.loads(f.metadata()["position"])
        for key in f.keys():
            f.get_tensor(key)
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line)


# --------------------------------------------------------------------------------------------------
# SIGKILL


def test_killed_twice_and_resumed_ends_exactly_as_an_uninterrupted_run(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_images=48, size=32)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rng = random.Random(0)
    reference = _cli("train", "--data", str(data), "--out", str(straight), *TRAIN_ARGS)  # runs alongside

    # Kill 1: a seeded moment after the first checkpoint.
    proc = _cli("train", "--data", str(data), "--out", str(killed), *TRAIN_ARGS)
    state = killed / "state.safetensors"
    _wait_for(state.exists, proc, "the first checkpoint")
    time.sleep(rng.uniform(0.05, 0.5))
    _kill(proc)
    _assert_loadable(killed)

    # Kill 2: once the resumed run has checkpointed, a seeded delay, then in the middle of a file write.
    before = _file_id(state)
    proc = _cli("train", "--resume", str(killed), "--no-progress")
    _wait_for(lambda: _file_id(state) != before, proc, "a checkpoint of the resumed run")
    time.sleep(rng.uniform(0.05, 0.3))
    _wait_for(lambda: bool(_temporary_files(killed)), proc, "a checkpoint write in progress")
    _kill(proc)
    _assert_loadable(killed)  # the torn write is a temporary file; the files it replaces are intact

    proc = _cli("train", "--resume", str(killed), "--no-progress")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    assert len(metrics(killed)) == 16
    assert_same_run(straight, killed)
    _assert_loadable(killed)
    assert _temporary_files(straight) == []
    assert _temporary_files(killed) == [], "the temporary files of killed writes are left behind"


# --------------------------------------------------------------------------------------------------
# crashes at chosen points, in process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_images=24, size=32)


def _cfg(tiny: Path, out: Path, **kw) -> TrainConfig:
    base = {"data": str(tiny), "out": str(out), "epochs": 2, "images_per_batch": 4, "progress": False,
            "warmup_steps": 2, "eval_every": 1, "checkpoint_every": 2, "model": dict(TINY_MODEL)}
    return TrainConfig(**{**base, **kw})


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise point runs, and no ``except Exception`` catches it."""


def test_a_kill_between_the_epoch_checkpoint_and_its_metrics_row_loses_no_row(tiny, tmp_path, monkeypatch):
    Trainer(_cfg(tiny, tmp_path / "straight")).fit()
    with monkeypatch.context() as m:
        def killed_before_writing(path, row):
            raise _Killed

        # epoch 1 is checkpointed, then the process dies before appending its row
        m.setattr(mmfuse.runs, "append_metrics", killed_before_writing)
        with pytest.raises(_Killed):
            Trainer(_cfg(tiny, tmp_path / "killed")).fit()
    resume(tmp_path / "killed", progress=False)
    assert [r["epoch"] for r in metrics(tmp_path / "killed")] == [1, 2], "an epoch's metrics row was lost"
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


def test_resume_removes_the_temporary_file_of_a_killed_write(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        original, steps = Trainer.train_step, []

        def step(self, batch):
            if len(steps) == 5:
                raise _Killed
            steps.append(1)
            return original(self, batch)

        m.setattr(Trainer, "train_step", step)
        with pytest.raises(_Killed):
            Trainer(_cfg(tiny, run)).fit()
    # What atomic_path leaves when the process dies mid-write: a partial file beside its target.
    fd, torn = tempfile.mkstemp(dir=run, prefix=".state.safetensors.", suffix=".tmp")
    os.write(fd, (run / "state.safetensors").read_bytes()[:1000])
    os.close(fd)
    resume(run, progress=False)
    _assert_loadable(run)
    assert _temporary_files(run) == [], f"{Path(torn).name} is still there after resuming"


# --------------------------------------------------------------------------------------------------
# tampered checkpoints


@pytest.fixture(scope="module")
def trained_run(tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(_cfg(tiny, run, epochs=1, eval_every=0)).fit()
    finally:
        torch.set_num_threads(threads)
    return run


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _weights_in_memory(path: Path) -> dict[str, torch.Tensor]:
    # load_file may map the file: copy the tensors before the file is rewritten under them
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def _reshape_one_tensor(path: Path) -> None:
    weights = _weights_in_memory(path)
    w = weights["head.4.weight"]  # (A, hidden)
    weights["head.4.weight"] = w.t().contiguous()  # (hidden, A)
    save_file(weights, str(path))


def _pickled_weights(path: Path) -> None:
    torch.save(_weights_in_memory(path), str(path))  # a pickle where safetensors belongs


def _drop_last_answer(d: dict) -> None:
    d["answers"] = d["answers"][:-1]


TAMPERING: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    # case: (file, tampering, file names the error may give)
    "weights truncated": ("model.safetensors", _truncate, ("model.safetensors",)),
    "weights missing": ("model.safetensors", Path.unlink, ("model.safetensors",)),
    "weights reshaped": ("model.safetensors", _reshape_one_tensor, ("model.safetensors",)),
    "weights pickled": ("model.safetensors", _pickled_weights, ("model.safetensors",)),
    "config not JSON": ("config.json", lambda p: p.write_text('{"num_answers": 6,'), ("config.json",)),
    "config a list": ("config.json", lambda p: p.write_text("[1, 2]"), ("config.json",)),
    "config unknown key": ("config.json", lambda p: _edit_json(p, lambda d: d.update(colour="blue")),
                           ("config.json",)),
    "config value of the wrong type": ("config.json", lambda p: _edit_json(p, lambda d: d.update(dim="32")),
                                       ("config.json",)),
    "vocab not JSON": ("vocab.json", _truncate, ("vocab.json",)),
    "vocab without answers": ("vocab.json", lambda p: _edit_json(p, lambda d: d.pop("answers")),
                              ("vocab.json",)),
    "vocab answers do not fit the config": ("vocab.json", lambda p: _edit_json(p, _drop_last_answer),
                                            ("vocab.json", "config.json")),
}


@pytest.fixture(params=list(TAMPERING))
def tampered(request, trained_run, tmp_path):
    name, tamper, named = TAMPERING[request.param]
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    tamper(run / name)
    return run, named


def test_tampered_checkpoint_fails_in_one_line_naming_the_file(tampered, capsys):
    run, named = tampered
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(run)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("mmfuse: error: ") and any(n in err for n in named), err


def _no_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, refuse)


def test_loading_never_unpickles(trained_run, tampered, monkeypatch):
    run, named = tampered
    _no_unpickling(monkeypatch)
    VQAModel.from_pretrained(trained_run)  # the intact checkpoint loads without pickle
    with pytest.raises(CheckpointError) as error:
        VQAModel.from_pretrained(run)
    assert any(n in str(error.value) for n in named)


def test_command_line_errors_are_one_line_in_a_real_process(trained_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    _truncate(broken / "model.safetensors")
    procs = {"evaluate": _cli("evaluate", "--checkpoint", str(broken)),
             "resume": _cli("train", "--resume", str(tmp_path / "no-such-run"), "--no-progress")}
    for what, named in (("evaluate", "model.safetensors"), ("resume", "no-such-run")):
        _, err = procs[what].communicate(timeout=120)
        assert procs[what].returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("mmfuse: error: ") and named in err, err
