"""Aspect ratio: squash (stretch), pad (letterbox) and crop (centre square), from file to model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmfuse.cli import main
from mmfuse.data import load_image, load_split
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
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for split, n in (("train", 6), ("test", 3)):
        lines = []
        for i in range(n):
            name = f"images/{split}{i}.png"
            strips(data / name, 40 + 8 * i, 20)
            lines.append(json.dumps({"image": name, "question": "what is in the middle?", "answer": f"a{i % 2}"}))
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--image-size", "16",
                 "--resize", "crop", "--dim", "16", "--num-heads", "2", "--images-per-batch", "2",
                 "--threads", "1", "--no-progress"]) == 0
    model = VQAModel.from_pretrained(run)
    assert model.config.resize == "crop"
    # Batches for the model carry cropped pixels, whatever the split was first loaded with.
    squashed = load_split(data, "train", image_size=16)
    batch = next(iter(VQATask().batches(model, squashed, batch_size=6, shuffle=False).epoch(0)))
    assert torch.equal(batch.images, load_split(data, "train", image_size=16, resize="crop").images)
    assert all(colors_present(im) == {1, 2} for im in batch.images)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 3
