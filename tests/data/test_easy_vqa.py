from __future__ import annotations

import logging
from pathlib import Path

import easy_vqa
import pytest
import torch
from safetensors.torch import load_file, save_file

import mmfuse.data.easy_vqa as easy_vqa_module
from mmfuse.data import (
    AnswerVocab,
    ImageGroupedBatches,
    WordTokenizer,
    encode_answers,
    has_split,
    load_easy_vqa,
    load_image,
    load_split,
    majority_answer_accuracy,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mmfuse-cache")


@pytest.fixture(scope="module")
def train(cache_dir):
    return load_easy_vqa("train", cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def test(cache_dir):
    return load_easy_vqa("test", cache_dir=cache_dir, progress=False)


@pytest.fixture
def no_decoding(monkeypatch):
    """Make decoding PNGs fail, so a load that succeeds must have come from the cache."""

    def fail(*args, **kwargs):
        raise AssertionError("images were decoded instead of read from the cache")

    monkeypatch.setattr(easy_vqa_module, "load_images", fail)


@pytest.mark.parametrize(
    ("name", "questions", "images"), [("train", 38_575, 4_000), ("test", 9_673, 1_000)]
)
def test_documented_counts(request, name, questions, images):
    split = request.getfixturevalue(name)
    assert len(split) == questions and split.name == f"easy-vqa/{name}"
    assert split.images.dtype == torch.uint8 and split.images.shape == (images, 3, 64, 64)
    assert split.image_index.dtype == torch.long and split.image_index.shape == (questions,)
    assert len(split.image_paths) == images
    assert set(split.answer_types) == {"yes/no", "color", "shape"}


def test_questions_in_package_order_and_pointing_at_their_images(train):
    texts, answers, image_ids = easy_vqa.get_train_questions()
    assert train.questions == texts and train.answers == answers
    paths = [train.image_paths[row] for row in train.image_index.tolist()]
    assert [int(Path(p).stem) for p in paths] == image_ids
    for row in (0, 1234, 3999):
        assert torch.equal(train.images[row], load_image(train.image_paths[row], 64))


def test_answer_types_follow_the_answers(train):
    kinds = {"yes": "yes/no", "no": "yes/no", "circle": "shape", "rectangle": "shape", "triangle": "shape"}
    assert all(t == kinds.get(a, "color") for a, t in zip(train.answers, train.answer_types, strict=True))
    assert len(set(train.answers)) == len(easy_vqa.get_answers()) == 13


def test_cache_is_written_and_reused(cache_dir, train, test, no_decoding):
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)  # no temporary files left
    assert any(f.startswith("easy-vqa-train-64px-") for f in files)
    again = load_easy_vqa("train", cache_dir=cache_dir)
    assert torch.equal(again.images, train.images) and torch.equal(again.image_index, train.image_index)


def test_load_split_uses_mmfuse_cache(monkeypatch, cache_dir, test, no_decoding):
    monkeypatch.setenv("MMFUSE_CACHE", str(cache_dir))
    assert torch.equal(load_split("easy-vqa", "test").images, test.images)
    assert has_split("easy-vqa", "train") and not has_split("easy-vqa", "val")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shape"])
def test_damaged_cache_is_rebuilt(tmp_path, cache_dir, test, damage, caplog):
    (cached,) = cache_dir.glob("easy-vqa-test-*.safetensors")
    target = tmp_path / cached.name
    if damage == "truncate":
        target.write_bytes(cached.read_bytes()[:5000])
    elif damage == "garbage":
        target.write_bytes(b"\x00" * 100)
    else:
        save_file({"images": torch.zeros(3, 3, 64, 64, dtype=torch.uint8)}, target)
    with caplog.at_level(logging.WARNING, logger="mmfuse.data.easy_vqa"):
        rebuilt = load_easy_vqa("test", cache_dir=tmp_path)
    assert "rebuilding" in caplog.text
    assert torch.equal(rebuilt.images, test.images)
    assert torch.equal(load_file(target)["images"], test.images)  # the rebuilt file is whole again


def test_unwritable_cache_dir_still_loads(tmp_path, test):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    assert torch.equal(load_easy_vqa("test", cache_dir=blocker / "cache").images, test.images)


def test_majority_baseline(train, test):
    # "yes" is the most common training answer (14,229 of 38,575, just ahead of "no")
    assert train.answers.count("yes") > train.answers.count("no") > 0
    assert majority_answer_accuracy(train, test) == test.answers.count("yes") / len(test)


def test_image_grouped_batches_on_easy_vqa(train):
    tokens, mask = WordTokenizer.fit(train.questions).encode(train.questions)
    answers = encode_answers(train.answers, AnswerVocab(train.answers))
    batches = ImageGroupedBatches(train, tokens, mask, answers, images_per_batch=64, seed=1)
    seen = []
    for batch in batches.epoch(0):
        rows = train.image_index[batch.question_ids]  # (Q,) each question's image in the split
        batch_rows = torch.full((len(batch.images),), -1).index_put_((batch.image_index,), rows)  # (I,)
        assert torch.equal(batch_rows[batch.image_index], rows)  # one split image per batch image
        assert torch.equal(batch.images, train.images[batch_rows])
        seen.append(batch.question_ids)
    assert len(seen) == len(batches) == 63  # ceil(4000 / 64)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(len(train)))


def test_unknown_split_rejected():
    with pytest.raises(ValueError, match="'train' and 'test'"):
        load_easy_vqa("val")  # type: ignore[arg-type]


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path))
    assert easy_vqa_module.default_cache_dir() == tmp_path
    monkeypatch.delenv("MMFUSE_CACHE")
    assert easy_vqa_module.default_cache_dir() == Path.home() / ".cache" / "mmfuse"



def test_a_resize_mode_is_recorded_and_gives_the_same_square_images(monkeypatch, tmp_path, test):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path))
    padded = load_split("easy-vqa", "test", resize="pad", progress=False)
    assert padded.resize == "pad" and test.resize == "squash"
    assert torch.equal(padded.images, test.images)  # every easy-VQA image is square


def test_disk_storage_keeps_the_images_in_a_mapped_file(monkeypatch, tmp_path, test):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path))
    disk = load_split("easy-vqa", "test", storage="disk", progress=False)
    assert disk.images.disk_rows.path.parent == tmp_path / "images"
    assert torch.equal(disk.images, test.images) and torch.equal(disk.image_index, test.image_index)
