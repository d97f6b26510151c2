"""The run directory under abuse: concurrent runs, overwrites, full disks, late failures, bad sizes and files."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmfuse.io
from mmfuse.cli import main
from mmfuse.io import CheckpointError, WriteError
from mmfuse.models import VQAModel
from mmfuse.runs import RunDirError, RunLock, check_new_run_dir, truncate_metrics
from mmfuse.train import TrainConfig, Trainer, resume
from tests.run_checks import assert_same_run, metrics
from tests.tiny_data import make_tiny_dataset

TINY_MODEL = {"cnn_stages": [[8], [16]], "dim": 32, "text_dim": 32, "num_heads": 2, "text_heads": 2}
TINY_FLAGS = ["--image-size", "32", "--dim", "32", "--num-heads", "2", "--images-per-batch", "4", "--threads", "1",
              "--no-progress", "--warmup-steps", "2", "--epochs", "1", "--precision", "fp32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_images=24, size=32)


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = {"data": str(data), "out": str(out), "epochs": 2, "images_per_batch": 4, "progress": False,
            "warmup_steps": 2, "model": dict(TINY_MODEL), "checkpoint_every": 3, "threads": 1}
    return TrainConfig(**{**base, **kw})


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmfuse: error: "), err
    return err[0]


# --------------------------------------------------------------------------------------------------
# 1. concurrent runs, 2. overwriting


def test_a_second_process_on_the_same_run_directory_fails_at_once_naming_the_holder(tiny, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmfuse.runs import RunLock; "
                               f"lock = RunLock({str(run)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["train", "--data", str(tiny), "--out", str(run), *TINY_FLAGS], ["train", "--resume", str(run)]):
            proc = subprocess.run([sys.executable, "-m", "mmfuse.cli", *args], capture_output=True, text=True,
                                  timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert proc.returncode == 2, proc.stderr
            assert f"in use by another mmfuse process (pid {holder.pid})" in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finally:
        holder.kill()
        holder.wait()
    RunLock(run).release()  # the holder's death released it


def test_a_finished_run_is_not_overwritten_unless_asked(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny), "--out", str(run), *TINY_FLAGS]) == 0
    before = (run / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tiny), "--out", str(run), *TINY_FLAGS, "--seed", "1"])
    assert e.value.code == 2 and "already holds a run" in _error_line(capsys)
    assert (run / "model.safetensors").read_bytes() == before
    assert main(["train", "--data", str(tiny), "--out", str(run), *TINY_FLAGS, "--seed", "1", "--overwrite"]) == 0
    assert (run / "model.safetensors").read_bytes() != before
    assert [r["epoch"] for r in metrics(run)] == [1], "rows of the replaced run were kept"


def test_out_that_is_a_file_or_under_one_is_one_line(tiny, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "run"):
        with pytest.raises(SystemExit) as e:
            main(["train", "--data", str(tiny), "--out", str(out), *TINY_FLAGS])
        assert e.value.code == 2 and "is a file, not a folder" in _error_line(capsys)
    with pytest.raises(RunDirError):
        check_new_run_dir(afile)


# --------------------------------------------------------------------------------------------------
# 3. full disk, and kills, at random points


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise point runs."""


def _faulty_fsync(monkeypatch, at: int, fault: str) -> dict:
    """Make the ``at``-th fsync fail as a full disk would (the file cut short first) or kill the process."""
    real, seen = os.fsync, {"n": 0}

    def fsync(fd):
        seen["n"] += 1
        if seen["n"] == at:
            path = os.readlink(f"/proc/self/fd/{fd}")
            os.truncate(path, os.fstat(fd).st_size // 2)  # what reached the disk before it filled: torn
            if fault == "kill":
                raise _Killed
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_full_disk_or_kill_at_random_points_always_resumes_to_the_uninterrupted_run(tiny, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    with monkeypatch.context() as m:
        counted = _faulty_fsync(m, at=-1, fault="none")
        Trainer(_cfg(tiny, straight)).fit()
    writes = counted["n"]
    assert writes > 10
    rng = random.Random(0)
    for i, at in enumerate(sorted(rng.sample(range(1, writes + 1), 6))):
        fault = ("disk", "kill")[i % 2]
        run = tmp_path / f"faulty{i}"
        with monkeypatch.context() as m:
            _faulty_fsync(m, at=at, fault=fault)
            with pytest.raises(WriteError if fault == "disk" else _Killed) as e:
                Trainer(_cfg(tiny, run)).fit()
        if fault == "disk":
            assert "No space left on device" in str(e.value) and str(run) in str(e.value), e.value
        if (run / "state.safetensors").exists():
            resume(run, progress=False)
        else:  # the fault came before the first checkpoint: nothing to resume, start again
            Trainer(_cfg(tiny, run), overwrite=True).fit()
        assert_same_run(straight, run)
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_full_disk_is_one_line_naming_the_file(tiny, tmp_path, monkeypatch, capsys):
    _faulty_fsync(monkeypatch, at=3, fault="disk")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tiny), "--out", str(tmp_path / "run"), *TINY_FLAGS, "--checkpoint-every", "1"])
    line = _error_line(capsys)
    assert e.value.code == 2 and "No space left on device" in line and str(tmp_path / "run") in line


def test_a_torn_last_metrics_row_is_dropped_with_a_warning(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, "train_lo')
    rows = truncate_metrics(tmp_path, 2)
    assert rows == [{"epoch": 1, "train_loss": 1.0}]
    assert "line 2: not a complete metrics row" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "train_loss": 1.0}\n'


# --------------------------------------------------------------------------------------------------
# 4. late failures


def test_a_missing_or_broken_test_split_fails_before_the_first_step(tiny, tmp_path, capsys):
    for name, broken in (("missing", None), ("broken", '{"image": "images/0000.png", "question": "q"}\n')):
        data = tmp_path / name
        data.mkdir()
        shutil.copytree(tiny / "images", data / "images")
        (data / "train.jsonl").write_text((tiny / "train.jsonl").read_text())
        if broken is not None:
            (data / "test.jsonl").write_text(broken)
        run = tmp_path / f"run-{name}"
        with pytest.raises(SystemExit) as e:
            main(["train", "--data", str(data), "--out", str(run), *TINY_FLAGS])
        line = _error_line(capsys)
        assert e.value.code == 2 and "test.jsonl" in line
        assert not (run / "state.safetensors").exists(), "training ran before the test split was read"


def test_the_epoch_is_saved_before_it_is_evaluated(tiny, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tiny, tmp_path / "run", epochs=1))

    def broken():
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.fit()
    monkeypatch.undo()
    # The epoch's checkpoint exists; resuming writes the row (evaluating now) without training again.
    resume(tmp_path / "run", progress=False)
    rows = metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1] and "test_accuracy" in rows[0]


# --------------------------------------------------------------------------------------------------
# 5. sizes, 6. tracebacks


@pytest.mark.parametrize("flags, message", [
    (["--threads", "-1"], "threads must be in [0, 4096]"),
    (["--label-smoothing", "2"], "label_smoothing must be in [0, 0.99]"),
    (["--image-size", "100000"], "image_size must be"),
    (["--grad-clip", "-1"], "grad_clip must be in [0, 1e+06]"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be in"),
    (["--eval-every", "-1"], "eval_every must be in"),
    (["--pool-queries", "-4"], "pool_queries must be in [0, 4096]"),
    (["--weight-decay", "-1"], "weight_decay must be in [0, 10]"),
    (["--dim", "0"], "dim must be in [1, 8192]"),
    (["--lr", "0"], "lr must be in"),
])
def test_out_of_range_settings_are_one_line(tiny, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tiny), "--out", str(tmp_path / "run"), *TINY_FLAGS, *flags])
    assert e.value.code == 2 and message in _error_line(capsys)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("saved") / "run"
    Trainer(_cfg(tiny, run, epochs=1)).fit()
    return run


def _copy(run: Path, to: Path) -> Path:
    to.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    return to


def test_a_model_too_large_for_memory_is_refused_with_the_estimate(saved, tmp_path, monkeypatch):
    run = _copy(saved, tmp_path / "big")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "dim": 8000, "text_dim": 8000}))
    monkeypatch.setattr("mmfuse.models.base.available_memory", lambda: 2**30)
    with pytest.raises(CheckpointError, match=r"needs about \d+\.\d GiB .* only 1\.0 GiB"):
        VQAModel.from_pretrained(run)
    config["dim"] = 20000
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"dim must be in \[1, 8192\], got 20000"):
        VQAModel.from_pretrained(run)


@pytest.mark.parametrize("edit, message", [
    (lambda d: {**d, "tokenizer": "word"}, "'tokenizer' must be a JSON object"),
    (lambda d: {**d, "answers": "yes"}, "'answers' must be a non-empty list of strings"),
    (lambda d: {**d, "answers": list(reversed(d["answers"]))}, "changed after it was saved"),
    (lambda d: {**d, "tokenizer": {"type": "word", "vocab": 5}}, "'vocab' must be a list of strings"),
])
def test_edited_vocab_json_is_refused(saved, tmp_path, edit, message):
    run = _copy(saved, tmp_path / "run")
    d = json.loads((run / "vocab.json").read_text())
    (run / "vocab.json").write_text(json.dumps(edit(d)))
    with pytest.raises(CheckpointError, match=message):
        VQAModel.from_pretrained(run)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.double(), "is torch.float64, the model holds torch.float32"),
    (lambda t: t.to(torch.int8), "is torch.int8"),
    (lambda t: t * float("nan"), "holds NaN or infinite values"),
])
def test_weights_of_another_dtype_or_not_finite_are_refused(saved, tmp_path, change, message):
    run = _copy(saved, tmp_path / "run")
    weights = load_file(str(run / "model.safetensors"))
    name = "head.4.weight"
    weights[name] = change(weights[name])
    save_file(weights, str(run / "model.safetensors"), metadata={"model_type": "vqa"})
    with pytest.raises(CheckpointError, match=message):
        VQAModel.from_pretrained(run)


@pytest.mark.parametrize("content, message", [
    ('{"epochs": "many"}', "epochs must be an int"),
    ("[1, 2]", "expected a JSON object"),
    ('{"epochs": 1' + "0" * 5000 + "}", "run.json: invalid JSON"),
])
def test_tampered_run_json_is_one_line_on_resume(saved, tmp_path, capsys, content, message):
    run = _copy(saved, tmp_path / "run")
    (run / "run.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", str(run)])
    assert e.value.code == 2 and message in _error_line(capsys)


@pytest.mark.parametrize("line, message", [
    (b'{"image": "images/0000.png", "question": "caf\xe9?", "answer": "a"}', "line 2: not UTF-8"),
    (b'{"image": "images/\\u0000x.png", "question": "q", "answer": "a"}', "line 2: image path"),
    (b'{"image": "' + b"a" * 5000 + b'.png", "question": "q", "answer": "a"}', "line 2: image path"),
    (b'{"image": "' + b"a" * 300 + b'.png", "question": "q", "answer": "a"}', "line 2: image path"),
    (b"[" * 100000 + b"]" * 100000, "line 2: invalid JSON"),
    (b'{"image": "images/0000.png", "question": "q", "answer": 1' + b"0" * 5000 + b"}", "line 2: invalid JSON"),
])
def test_malformed_dataset_lines_are_one_line_naming_the_line(tiny, tmp_path, capsys, line, message):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(tiny / "images", data / "images")
    first = (tiny / "train.jsonl").read_bytes().splitlines()[0]
    (data / "train.jsonl").write_bytes(first + b"\n" + line + b"\n")
    (data / "test.jsonl").write_bytes(first + b"\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY_FLAGS])
    assert e.value.code == 2 and message in _error_line(capsys)


def test_predictions_into_a_directory_is_one_line(saved, tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint", str(saved), "--data", str(tiny), "--predictions", str(tmp_path)])
    assert e.value.code == 2 and str(tmp_path) in _error_line(capsys)


def test_an_internal_error_says_so_in_one_line_before_the_traceback(saved, monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr("mmfuse.tasks.vqa.VQATask.evaluate", bug)
    with pytest.raises(KeyError):
        main(["evaluate", "--checkpoint", str(saved)])
    assert capsys.readouterr().err.startswith("mmfuse: internal error: KeyError: 'oops' (a bug in mmfuse")


# --------------------------------------------------------------------------------------------------
# 7. a dataset that changed, 8. paths and permissions


def test_resume_refuses_a_changed_dataset_unless_allowed(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(tiny / "images", data / "images")
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text((tiny / f"{split}.jsonl").read_text())
    run = tmp_path / "run"
    Trainer(_cfg(data, run, epochs=1)).fit()
    with open(data / "train.jsonl", "a") as f:
        row = {"image": "images/0000.png", "question": "new?", "answer": "red", "answer_type": "color"}
        f.write(json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", str(run)])
    assert e.value.code == 2 and "the dataset changed" in _error_line(capsys)
    assert main(["train", "--resume", str(run), "--allow-data-change", "--no-progress"]) == 0


def test_run_json_holds_the_absolute_data_path_and_files_are_not_private(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny.parent)
    run = tmp_path / "run"
    assert main(["train", "--data", tiny.name, "--out", str(run), *TINY_FLAGS]) == 0
    assert json.loads((run / "run.json").read_text())["data"] == str(tiny.resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--checkpoint", str(run), "--json"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors", "vocab.json", "run.json", "state.safetensors", "metrics.jsonl"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask, name


def test_an_image_linked_from_outside_the_dataset_is_refused(tiny, tmp_path, capsys):
    outside = tmp_path / "secret.png"
    outside.write_bytes((tiny / "images" / "0000.png").read_bytes())
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "link.png").symlink_to(outside)
    line = json.dumps({"image": "images/link.png", "question": "q", "answer": "a"})
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(line + "\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY_FLAGS])
    assert e.value.code == 2 and "outside the dataset directory" in _error_line(capsys)


def test_atomic_writes_leave_nothing_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    target.write_text("old")
    _faulty_fsync(monkeypatch, at=1, fault="disk")
    with pytest.raises(WriteError, match=r"config\.json: could not write \(No space left on device\)"):
        mmfuse.io.atomic_write_text(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]
