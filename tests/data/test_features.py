"""Precomputed image features in JSONL datasets: loading, errors, and training a model without a vision encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmfuse import tasks
from mmfuse.cli import main
from mmfuse.data import DataError, load_split
from mmfuse.models import VQAModel

pytestmark = pytest.mark.usefixtures("single_thread")


def make_feature_dataset(root: Path, *, n_images: int = 12, tokens: int = 3, dim: int = 8) -> Path:
    """Feature files whose first channel carries the answer (colour of a made-up shape)."""
    (root / "feats").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"train": [], "test": []}
    g = torch.Generator().manual_seed(0)
    for i in range(n_images):
        color = ("red", "blue")[i % 2]
        x = torch.randn(tokens, dim, generator=g) * 0.1
        x[:, 0] = 1.0 if color == "red" else -1.0
        save_file({"features": x if tokens > 1 else x[0]}, root / f"feats/{i:04d}.safetensors")
        split = "train" if i < 8 else "test"
        rows[split].append(json.dumps({"image_features": f"feats/{i:04d}.safetensors",
                                       "question": "what color is it?", "answer": color}))
    for split, lines in rows.items():
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_loads_tokens_and_vectors(tmp_path):
    split = load_split(make_feature_dataset(tmp_path / "a"), "train")
    assert split.has_features and split.images.shape == (8, 3, 8) and split.images.dtype == torch.float32
    vectors = load_split(make_feature_dataset(tmp_path / "b", tokens=1), "test")
    assert vectors.images.shape == (4, 1, 8)  # a (D,) vector is one token


@pytest.mark.parametrize("tensor, message", [
    (torch.zeros(2, 3, 8), r"feats/0003\.safetensors: image features must be \(N, D\) tokens or \(D,\) a vector, "
                           r"got shape \(2, 3, 8\)"),
    (torch.zeros(3, 5), r"feats/0003\.safetensors: image features of shape \(3, 5\), expected \(3, 8\)"),
    (torch.zeros(3, 8, dtype=torch.long), "must be floating point"),
])
def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path, tensor, message):
    root = make_feature_dataset(tmp_path)
    save_file({"features": tensor}, root / "feats/0003.safetensors")
    with pytest.raises(DataError, match=message) as info:
        load_split(root, "train")
    assert "train.jsonl line 4" in str(info.value) and "\n" not in str(info.value)


def test_missing_tensor_name_and_mixed_lines(tmp_path):
    root = make_feature_dataset(tmp_path)
    save_file({"feats": torch.zeros(3, 8)}, root / "feats/0001.safetensors")
    with pytest.raises(DataError, match="no tensor named 'features'"):
        load_split(root, "train")
    lines = (root / "test.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"image": "x.png", "question": "q", "answer": "red"})
    (root / "x.png").write_bytes(b"")
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 2: a split gives 'image' on every line or 'image_features'"):
        load_split(root, "test")


def test_trains_and_evaluates_without_a_vision_encoder(tmp_path, capsys):
    root = make_feature_dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), "--epochs", "30", "--dim", "16", "--num-heads",
                 "2", "--images-per-batch", "4", "--threads", "1", "--no-progress", "--lr", "3e-3"]) == 0
    model = VQAModel.from_pretrained(run)
    assert model.vision is None and model.config.vision == "features" and model.config.feature_dim == 8
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0  # the answer is in channel 0

    # Test features of another width: a one-line error naming the split and both shapes.
    other = make_feature_dataset(tmp_path / "other", dim=5)
    with pytest.raises(DataError, match=r"other/test: image features are \(3, 5\), the model takes \(N, 8\)"):
        tasks.for_model(model).evaluate(model, load_split(other, "test"))
