"""Decoded images on disk: chosen by setting or size, built once, reused, batched exactly like in memory; the
command line's --image-storage / --image-memory-gb reach it and are kept by the run."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from mmfuse.cli import main
from mmfuse.data import ImageGroupedBatches, ImageStorage, load_split
from mmfuse.data.captions import load_caption_split, write_caption_dataset
from mmfuse.data.classify import load_classify_split
from mmfuse.data.context_shapes import write_context_dataset
from mmfuse.data.disk import DiskRows
from mmfuse.train import TrainConfig
from tests.tiny_data import make_tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    return make_tiny_dataset(tmp_path / "tiny")


def batches(split, **kw):
    n = len(split)
    return ImageGroupedBatches(split, torch.ones(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.bool),
                               torch.zeros(n, dtype=torch.long), images_per_batch=5, **kw)


def test_disk_split_equals_memory_split(tiny, tmp_path, monkeypatch, caplog):
    memory = load_split(tiny, "train", image_size=16)
    assert getattr(memory.images, "disk_rows", None) is None
    disk = load_split(tiny, "train", image_size=16, storage="disk")
    assert isinstance(disk.images.disk_rows, DiskRows)
    assert torch.equal(disk.images, memory.images)
    files = list((tmp_path / "cache" / "images").glob("*.npy"))
    assert len(files) == 1 and files[0].stat().st_size >= memory.images.numel()
    # Every batch, read from the file with pread, equals the in-memory one.
    for a, b in zip(batches(disk, seed=3).epoch(1), batches(memory, seed=3).epoch(1), strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.question_ids, b.question_ids)
    with caplog.at_level(logging.INFO, logger="mmfuse.data.storage"):
        again = load_split(tiny, "train", image_size=16, storage="disk")
    assert f"image cache: reused {len(memory.images)} images from {files[0]}" in caplog.text
    assert torch.equal(again.images, memory.images)


def test_key_follows_the_files_and_the_size(tiny, tmp_path):
    load_split(tiny, "train", image_size=16, storage="disk")
    load_split(tiny, "train", image_size=8, storage="disk")
    image = tiny / "images" / "0000.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # the file changed
    load_split(tiny, "train", image_size=16, storage="disk")
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 3


def test_auto_goes_to_disk_above_the_threshold(tiny, tmp_path):
    assert ImageStorage().where(10**9) == "memory" and ImageStorage().where(3 * 2**30) == "disk"
    assert ImageStorage(memory_gb=0.5).where(10**9) == "disk"
    assert ImageStorage("memory", 0).where(10**12) == "memory" and ImageStorage("disk").where(1) == "disk"
    size = 16 * 16 * 3 * 16  # the 16 training images at 16 px
    assert getattr(load_split(tiny, "train", image_size=16, storage=ImageStorage("auto", size / 2**30)).images,
                   "disk_rows", None) is None
    assert not (tmp_path / "cache" / "images").exists()
    above = load_split(tiny, "train", image_size=16, storage=ImageStorage("auto", (size - 1) / 2**30))
    assert isinstance(above.images.disk_rows, DiskRows)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "ram"}, "image_storage must be one of auto, memory, disk, got 'ram'"),
    ({"memory_gb": -1}, "image_memory_gb must be a finite number of GiB >= 0, got -1"),
    ({"memory_gb": float("nan")}, "image_memory_gb must be a finite number of GiB >= 0, got nan"),
    ({"memory_gb": "2"}, "image_memory_gb must be a finite number of GiB >= 0, got '2'"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageStorage(**kwargs)
    fields = {"image_storage" if k == "mode" else "image_memory_gb": v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


def test_a_truncated_cache_file_is_rebuilt(tiny, tmp_path):
    first = load_split(tiny, "test", image_size=16, storage="disk").images.clone()
    (file,) = (tmp_path / "cache" / "images").glob("*.npy")
    file.write_bytes(file.read_bytes()[:200])
    assert torch.equal(load_split(tiny, "test", image_size=16, storage="disk").images, first)


def test_classify_and_caption_splits_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    ctx = write_context_dataset(tmp_path / "ctx", num_train_images=4, num_test_images=1, image_size=24,
                                context="image")
    memory, disk = (load_classify_split(ctx, "train", image_size=16, storage=s) for s in ("memory", "disk"))
    for a, b in ((memory.images, disk.images), (memory.context_images, disk.context_images)):
        assert isinstance(b.disk_rows, DiskRows) and torch.equal(a, b)
    captions = write_caption_dataset(tmp_path / "cap", num_train_images=3, num_test_images=1)
    memory, disk = (load_caption_split(captions, "test", image_size=16, storage=s) for s in ("memory", "disk"))
    assert isinstance(disk.images.disk_rows, DiskRows) and torch.equal(memory.images, disk.images)
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 3  # images, contexts, captions


TINY = ["--image-size", "16", "--dim", "16", "--num-heads", "2", "--images-per-batch", "8", "--threads", "1",
        "--no-progress", "--epochs", "1", "--fusion", "concat"]


def cached_files(tmp_path):
    return sorted((tmp_path / "cache" / "images").glob("*.npy"))


def test_the_command_line_chooses_the_storage_and_the_run_keeps_it(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny), "--out", str(run), "--image-storage", "disk", *TINY]) == 0
    assert len(cached_files(tmp_path)) == 2  # the train and the test split, each decoded into a file once
    settings = json.loads((run / "run.json").read_text())
    assert settings["image_storage"] == "disk" and settings["image_memory_gb"] == 2
    capsys.readouterr()

    def again(*args):  # the files removed, then a command that loads the test split
        shutil.rmtree(tmp_path / "cache" / "images", ignore_errors=True)
        assert main(list(args)) == 0
        return len(cached_files(tmp_path)) if (tmp_path / "cache" / "images").exists() else 0

    assert again("evaluate", "--checkpoint", str(run), "--json") == 1  # the run's own setting
    assert again("evaluate", "--checkpoint", str(run), "--json", "--image-storage", "memory") == 0
    assert again("predict", "--checkpoint", str(run), "--data", str(tiny), "--predictions",
                 str(tmp_path / "p.jsonl")) == 1
    assert again("robustness", "--checkpoint", str(run), "--out", str(tmp_path / "rob"), "--limit", "2") == 1
    # --resume keeps the run's setting (both splits to disk again), and may change where images live.
    assert again("train", "--resume", str(run), "--no-progress") == 2
    assert again("train", "--resume", str(run), "--no-progress", "--image-storage", "memory") == 0
    with pytest.raises(SystemExit):  # a setting of what the run computes is still refused
        main(["train", "--resume", str(run), "--image-storage", "disk", "--lr", "0.1"])
    assert "drop --lr" in capsys.readouterr().err


def test_auto_with_a_zero_threshold_goes_to_disk(tiny, tmp_path):
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "run"), "--image-memory-gb", "0",
                 *TINY]) == 0
    assert len(cached_files(tmp_path)) == 2


def test_ablate_passes_the_storage_to_every_run(tiny, tmp_path, capsys):
    assert main(["ablate", "--data", str(tiny), "--fusions", "concat", "--epochs", "1", "--out",
                 str(tmp_path / "ablation"), "--no-progress", "--image-storage", "disk"]) == 0
    assert len(cached_files(tmp_path)) == 2  # train and test at 64 px, decoded once, reused by the measurement
    assert json.loads((tmp_path / "ablation" / "concat" / "run.json").read_text())["image_storage"] == "disk"


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--image-storage", "ram"], "argument --image-storage: invalid choice: 'ram'"),
    (["train", "--image-memory-gb", "-1"], "argument --image-memory-gb: expected a number of GiB >= 0, got '-1'"),
    (["evaluate", "--checkpoint", "x", "--image-memory-gb", "lots"], "expected a number of GiB >= 0, got 'lots'"),
    (["predict", "--checkpoint", "x", "--image", "a.png", "--question", "q", "--image-storage", "disk"],
     "--image-storage: only with --data"),
])
def test_bad_flags_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_setting_in_run_json_names_the_file(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny), "--out", str(run), *TINY]) == 0
    settings = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**settings, "image_storage": "ram"}))
    capsys.readouterr()
    for args in (["evaluate", "--checkpoint", str(run)], ["train", "--resume", str(run)]):
        with pytest.raises(SystemExit):
            main(args)
        err = capsys.readouterr().err
        assert "run.json" in err and "image_storage must be one of auto, memory, disk, got 'ram'" in err
