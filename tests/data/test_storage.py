"""Decoded images on disk: chosen by setting or size, built once, reused, batched exactly like in memory."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from mmfuse.data import ImageGroupedBatches, load_split
from mmfuse.data.disk import DiskRows
from mmfuse.data.storage import image_storage
from tests.tiny_data import make_tiny_dataset


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
    monkeypatch.setenv("MMFUSE_IMAGE_STORAGE", "disk")
    disk = load_split(tiny, "train", image_size=16)
    assert isinstance(disk.images.disk_rows, DiskRows)
    assert torch.equal(disk.images, memory.images)
    files = list((tmp_path / "cache" / "images").glob("*.npy"))
    assert len(files) == 1 and files[0].stat().st_size >= memory.images.numel()
    # Every batch, read from the file with pread, equals the in-memory one.
    for a, b in zip(batches(disk, seed=3).epoch(1), batches(memory, seed=3).epoch(1), strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.question_ids, b.question_ids)
    with caplog.at_level(logging.INFO, logger="mmfuse.data.storage"):
        again = load_split(tiny, "train", image_size=16)
    assert f"image cache: reused {len(memory.images)} images from {files[0]}" in caplog.text
    assert torch.equal(again.images, memory.images)


def test_key_follows_the_files_and_the_size(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSE_IMAGE_STORAGE", "disk")
    load_split(tiny, "train", image_size=16)
    load_split(tiny, "train", image_size=8)
    image = tiny / "images" / "0000.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # the file changed
    load_split(tiny, "train", image_size=16)
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 3


def test_auto_goes_to_disk_above_the_threshold(monkeypatch):
    assert image_storage(10**9) == "memory" and image_storage(3 * 2**30) == "disk"
    monkeypatch.setenv("MMFUSE_IMAGE_MEMORY_GB", "0.5")
    assert image_storage(10**9) == "disk"
    monkeypatch.setenv("MMFUSE_IMAGE_STORAGE", "memory")
    assert image_storage(10**12) == "memory"
    monkeypatch.setenv("MMFUSE_IMAGE_STORAGE", "ram")
    with pytest.raises(ValueError, match="MMFUSE_IMAGE_STORAGE"):
        image_storage(1)


def test_a_truncated_cache_file_is_rebuilt(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSE_IMAGE_STORAGE", "disk")
    first = load_split(tiny, "test", image_size=16).images.clone()
    (file,) = (tmp_path / "cache" / "images").glob("*.npy")
    file.write_bytes(file.read_bytes()[:200])
    assert torch.equal(load_split(tiny, "test", image_size=16).images, first)
