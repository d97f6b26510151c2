from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmfuse import fusion as fusion_registry
from mmfuse.data import AnswerVocab, WordTokenizer, load_split
from mmfuse.evaluate import evaluate
from mmfuse.models.vqa import VQAConfig, VQAModel
from mmfuse.report import (
    attention_figure,
    attention_map,
    attention_maps,
    plot_confusion,
    plot_training_curves,
    write_report,
)
from mmfuse.train import TrainConfig, train
from tests.tiny_data import make_tiny_dataset

TINY_MODEL = {"cnn_stages": [[8], [16]], "dim": 32, "text_dim": 32, "num_heads": 2, "image_size": 32}
GRID = (8, 8)  # 32 px through two 2x2 max-pools

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset dir, cross_attention run dir trained 2 epochs on it)."""
    root = tmp_path_factory.mktemp("report")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: a second thread only adds scheduling cost (see conftest)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MMFUSE_CACHE", str(root / "cache"))
            data = make_tiny_dataset(root / "data")
            run = root / "run"
            train(TrainConfig(data=str(data), out=str(run), epochs=2, seed=0, images_per_batch=8,
                              progress=False, model={**TINY_MODEL, "fusion": "cross_attention"}))
    finally:
        torch.set_num_threads(threads)
    return data, run


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))


def untrained(fusion: str, **options: object) -> VQAModel:
    questions = ["what color is the shape?", "what shape is it?"]
    tokenizer = WordTokenizer.fit(questions)
    config = VQAConfig(num_answers=3, vocab_size=len(tokenizer), fusion=fusion, **{**TINY_MODEL, **options})
    return VQAModel(config, answers=AnswerVocab(["blue", "circle", "red"]), tokenizer=tokenizer).eval()


def image() -> torch.Tensor:
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()


def test_report_references_valid_pngs(tiny: tuple[Path, Path]) -> None:
    data, run = tiny
    report = write_report(run, examples=3)
    assert report == run / "report.md"
    text = report.read_text(encoding="utf-8")
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(refs) == 2 + 3  # curves, confusion, three attention maps
    for ref in refs:
        assert_png(run / ref)
    # one table row per epoch, and the per-answer-type accuracies of the tiny dataset
    assert len(re.findall(r"^\| [12] \|", text, flags=re.M)) == 2
    for answer_type in ("color", "shape", "yes/no"):
        assert f"| {answer_type} |" in text
    accuracy = evaluate(VQAModel.from_pretrained(run), load_split(data, "test", image_size=32)).accuracy
    assert f"**{accuracy:.2%}**" in text


def test_attention_map_one_panel_per_token(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = tiny
    model = VQAModel.from_pretrained(run)
    img = image()
    question = "what color is the shape?"
    maps = attention_maps(model, img, question)
    assert maps.labels == ["<cls>", "what", "color", "is", "the", "shape", "?"]
    assert maps.maps.shape == (7, *GRID)
    # every text token attends over all image positions (nothing masked): each map sums to 1
    torch.testing.assert_close(maps.maps.sum(dim=(1, 2)), torch.ones(7))
    assert len(attention_figure(img, maps).axes) == 1 + 7 + 1  # the image, one panel per token, colour bar
    assert maps.num_keys == GRID[0] * GRID[1]

    out = tmp_path / "attn.png"
    answer = attention_map(model, img, question, out)
    assert_png(out)
    expected = model.answer(img[None], [question]).argmax(-1).item()
    assert answer == model.answers.names[expected]

    heads = attention_maps(model, img, question, per_head=True)
    H = model.config.num_heads
    assert heads.labels[:H] == [f"<cls> h{i}" for i in range(H)]
    assert heads.maps.shape == (7 * H, *GRID)
    # the head-averaged panels are the mean of the per-head ones
    torch.testing.assert_close(heads.maps.reshape(7, H, *GRID).mean(dim=1), maps.maps)


def test_self_attention_uses_text_to_image_block() -> None:
    model = untrained("self_attention")
    img = image()
    maps = attention_maps(model, img, "what shape is it?")
    ids, mask = model.tokenize(["what shape is it?"])
    with torch.no_grad():
        full = model.fuse(img[None], ids, mask, need_weights=True).attention[0].mean(0)  # (Ni + L, Ni + L)
    n_image = GRID[0] * GRID[1]
    assert maps.maps.shape == (ids.shape[1], *GRID)
    torch.testing.assert_close(maps.maps.flatten(1), full[n_image:, :n_image])
    assert bool((maps.maps.sum(dim=(1, 2)) < 1).all())  # the rest of each row falls on text tokens


def test_attention_pooling_shows_first_latents() -> None:
    model = untrained("attention_pooling", fusion_options={"num_queries": 12})
    maps = attention_maps(model, image(), "what shape is it?")
    assert [label.split(" (")[0] for label in maps.labels] == [f"latent {i}" for i in range(8)]
    assert maps.maps.shape == (8, *GRID)
    assert bool((maps.maps.sum(dim=(1, 2)) < 1).all())


def test_multi_hop_shows_one_panel_per_hop() -> None:
    model = untrained("multi_hop", depth=3)
    img = image()
    maps = attention_maps(model, img, "what shape is it?")
    assert maps.labels == ["hop 1", "hop 2", "hop 3"] and maps.maps.shape == (3, *GRID)
    ids, mask = model.tokenize(["what shape is it?"])
    with torch.no_grad():
        weights = model.fuse(img[None], ids, mask, need_weights=True).attention[0]  # (H, hops, Ni)
    torch.testing.assert_close(maps.maps.flatten(1), weights.mean(0))
    torch.testing.assert_close(maps.maps.sum(dim=(1, 2)), torch.ones(3))


@pytest.mark.parametrize("fusion", ["concat", "late", "product", "text_only", "image_only"])
def test_fusions_without_attention_are_rejected(fusion: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"fusion {fusion} has no attention to show"):
        attention_map(untrained(fusion), image(), "what shape is it?", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_attention_maps_follow_the_layout_the_fusion_declares(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fusion the report has never heard of by name gets maps from its ``attention_layout`` alone."""

    class Renamed(fusion_registry.CrossAttentionFusion):
        pass

    class Silent(fusion_registry.CrossAttentionFusion):
        attention_layout = None

    monkeypatch.setitem(fusion_registry._REGISTRY, "renamed_cross", Renamed)
    monkeypatch.setitem(fusion_registry._REGISTRY, "silent_cross", Silent)
    maps = attention_maps(untrained("renamed_cross"), image(), "what shape is it?")
    assert maps.maps.shape[1:] == GRID and maps.labels[0] == "<cls>"
    with pytest.raises(ValueError, match="fusion silent_cross has no attention to show"):
        attention_maps(untrained("silent_cross"), image(), "what shape is it?")


def test_weightless_impl_and_pooled_latents_are_rejected() -> None:
    with pytest.raises(ValueError, match="impl 'auto' or 'math'"):
        attention_maps(untrained("cross_attention", impl="chunked"), image(), "what shape is it?")
    with pytest.raises(ValueError, match="pool_queries=4"):
        attention_maps(untrained("cross_attention", pool_queries=4), image(), "what shape is it?")
    with pytest.raises(ValueError, match=r"uint8 \(3, S, S\)"):
        attention_maps(untrained("cross_attention"), image().float(), "what shape is it?")


def test_curves_and_confusion(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = tiny
    assert_png(plot_training_curves(run / "metrics.jsonl", tmp_path / "curves.png"))
    result = evaluate(VQAModel.from_pretrained(run), load_split(data, "test", image_size=32))
    assert_png(plot_confusion(result, tmp_path / "confusion.png"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no metrics rows"):
        plot_training_curves(empty, tmp_path / "none.png")


def test_curves_plot_evaluated_epochs_only(tmp_path: Path) -> None:
    rows = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5},
            {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.8, "test_accuracy": 0.7}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_png(plot_training_curves(path, tmp_path / "curves.png"))
