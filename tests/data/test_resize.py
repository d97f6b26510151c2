"""Aspect ratio: squash (stretch), pad (letterbox) and crop (centre square), from file to model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmfuse.cli import main
from mmfuse.data import DataError, load_image, load_split
from mmfuse.evaluate import evaluate
from mmfuse.models import VQAModel
from mmfuse.tasks.vqa import VQATask

pytestmark = pytest.mark.usefixtures("single_thread")

COLORS = [(0, 200, 0), (220, 0, 0), (0, 0, 220), (230, 230, 0)]  # green, red, blue, yellow strips


def strips(path, width=40, height=20):
    """Four vertical strips of width / 4 each."""
    im = Image.new("RGB", (width, height))
    for k, color in enumerate(COLORS):
        im.paste(color, (k * width // 4, 0, (k + 1) * width // 4, height))
    im.save(path)
    return path


def colors_present(image):
    pixels = {tuple(p) for p in image.permute(1, 2, 0).reshape(-1, 3).tolist()}
    return {k for k, c in enumerate(COLORS) if c in pixels}


SPLITS = (("train", 6), ("test", 3))


def strips_dataset(data):
    """A JSONL dataset of wide strip images (40..80 x 20 px) that differ between pad, crop and squash."""
    (data / "images").mkdir(parents=True)
    for split, n in SPLITS:
        lines = []
        for i in range(n):
            name = f"images/{split}{i}.png"
            strips(data / name, 40 + 8 * i, 20)
            lines.append(json.dumps({"image": name, "question": "what is in the middle?", "answer": f"a{i % 2}"}))
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def test_three_modes(tmp_path):
    path = strips(tmp_path / "wide.png")
    squash = load_image(path, 16)
    assert colors_present(squash) == {0, 1, 2, 3} and (squash.sum(0) > 0).all()
    pad = load_image(path, 16, resize="pad")  # 40x20 -> 16x8, centred: 4 black rows above and below
    assert (pad[:, :4] == 0).all() and (pad[:, 12:] == 0).all() and (pad[:, 4:12].sum(0) > 0).all()
    assert colors_present(pad) == {0, 1, 2, 3}
    crop = load_image(path, 16, resize="crop")  # 40x20 -> 32x16, columns 8..24: the middle two strips
    assert colors_present(crop) == {1, 2} and (crop.sum(0) > 0).all()
    square = strips(tmp_path / "square.png", 20, 20)
    assert all(torch.equal(load_image(square, 16, resize=m), load_image(square, 16)) for m in ("pad", "crop"))
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image(path, 16, resize="fit")


def test_model_trains_and_evaluates_with_its_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    data = strips_dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--image-size", "16",
                 "--resize", "crop", "--dim", "16", "--num-heads", "2", "--images-per-batch", "2",
                 "--threads", "1", "--no-progress", "--report"]) == 0
    model = VQAModel.from_pretrained(run)
    assert model.config.resize == "crop"
    # Batches for the model carry cropped pixels; a split decoded otherwise is refused, not decoded again.
    task = VQATask()
    cropped = task.load_split(data, "train", **task.load_options(model))
    batch = next(iter(task.batches(model, cropped, batch_size=6, shuffle=False).epoch(0)))
    assert torch.equal(batch.images, load_split(data, "train", image_size=16, resize="crop").images)
    assert all(colors_present(im) == {1, 2} for im in batch.images)
    squashed = load_split(data, "train", image_size=16)
    for use in (lambda: task.batches(model, squashed, batch_size=6), lambda: evaluate(model, squashed)):
        with pytest.raises(DataError, match=r"resize='squash', the model was trained with 'crop'; load the split "
                                            r"with resize='crop'"):
            use()
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 3
    # The other commands that load a split for the model load it cropped too (evaluate refuses any other).
    assert main(["robustness", "--checkpoint", str(run), "--out", str(tmp_path / "robustness")]) == 0
    assert main(["predict", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--predictions",
                 str(tmp_path / "answers.jsonl")]) == 0


def test_each_image_is_decoded_once_per_split_load(tmp_path, monkeypatch):
    import mmfuse.data.images as images

    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    data = strips_dataset(tmp_path / "data")
    decoded: list[str] = []
    decode = images._decode

    def counting(source, size, name, path, resize="squash"):
        decoded.append(f"{name}:{resize}")
        return decode(source, size, name, path, resize)

    monkeypatch.setattr(images, "_decode", counting)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--image-size", "16",
                 "--resize", "pad", "--dim", "16", "--num-heads", "2", "--images-per-batch", "2",
                 "--threads", "1", "--no-progress"]) == 0
    files = sorted(str((data / "images").resolve() / f"{s}{i}.png") for s, n in SPLITS for i in range(n))
    assert sorted(decoded) == [f"{f}:pad" for f in files]  # train and test, each image once, padded
    decoded.clear()
    assert main(["evaluate", "--checkpoint", str(run), "--json"]) == 0
    assert sorted(decoded) == [f"{f}:pad" for f in files if "/images/test" in f]
