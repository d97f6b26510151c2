"""The caption and vqa-generate tasks end to end: data, make-dataset, train, evaluate, predict, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmfuse import tasks
from mmfuse.cli import main
from mmfuse.data import DataError
from mmfuse.data.captions import describe, load_caption_split, normalize_caption, write_caption_dataset
from mmfuse.models import PretrainedModel
from mmfuse.tasks.caption import CaptionResult, caption_scores
from tests.tiny_data import make_tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--image-size", "32", "--dim", "32", "--num-heads", "2", "--depth", "1", "--images-per-batch", "8",
        "--threads", "1", "--no-progress", "--warmup-steps", "2", "--epochs", "1"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    assert main(["make-dataset", "captions", "--out", str(root), "--train-images", "24", "--test-images", "6",
                 "--seed", "3"]) == 0
    return root


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "caption"
    assert main(["train", "--task", "caption", "--data", str(scenes), "--out", str(out), *TINY]) == 0
    return out


def test_scene_captions_name_objects_left_to_right(scenes):
    lines = [json.loads(line) for line in (scenes / "test.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for line in lines:
        words = normalize_caption(line["caption"]).replace(" and ", " , ").split(" , ")
        assert 2 <= len(words) <= 4
        for phrase in words:
            article, size, _colour, shape = phrase.split()
            assert article == "a" and size in ("small", "large") and shape in ("circle", "square", "triangle")
        assert Image.open(scenes / line["image"]).size[0] in range(64, 113)
    assert describe([("small", "red", "circle")]) == "a small red circle"
    assert describe([("small", "red", "circle"), ("large", "blue", "square"), ("small", "green", "triangle")]) == (
        "a small red circle, a large blue square and a small green triangle")


def test_generator_is_deterministic(tmp_path):
    a = write_caption_dataset(tmp_path / "a", num_train_images=3, num_test_images=1, seed=5)
    b = write_caption_dataset(tmp_path / "b", num_train_images=3, num_test_images=1, seed=5)
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()
    assert (a / "images/00001.png").read_bytes() == (b / "images/00001.png").read_bytes()


def test_several_references_and_bad_lines(tmp_path, scenes):
    (tmp_path / "img.png").write_bytes((scenes / "images/00000.png").read_bytes())
    (tmp_path / "test.jsonl").write_text(json.dumps({"image": "img.png", "captions": ["one", "two"]}) + "\n"
                                         + json.dumps({"image": "img.png", "caption": "three"}) + "\n")
    split = load_caption_split(tmp_path, "test")
    assert split.captions == [["one", "two", "three"]] and split.images.shape == (1, 3, 64, 64)
    (tmp_path / "test.jsonl").write_text(json.dumps({"image": "img.png", "captions": []}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl line 1: expected 'caption'"):
        load_caption_split(tmp_path, "test")


def test_metrics_from_pycocoevalcap():
    refs = [["a small red circle"], ["a large blue square", "a big blue square"]]
    perfect = caption_scores(["a small red circle", "a large blue square"], refs)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["cider"] > 0
    worse = caption_scores(["a small red square", "a large green square"], refs)
    assert worse["bleu4"] < 0.5 and worse["cider"] < perfect["cider"]
    result = CaptionResult(["A small  Red circle", "a large green square"], refs, ["x", "y"])
    assert result.summary()["exact_match"] == 0.5  # case and spacing are normalised away, words are not
    assert normalize_caption("A small red circle, a cat.") == "a small red circle , a cat ."


def test_train_evaluate_predict(run, scenes, tmp_path, capsys):
    model = PretrainedModel.from_pretrained(run)
    assert model.model_type == "captioner" and (run / "tokenizer.json").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"test_exact_match", "test_bleu4", "test_cider"} <= set(metrics[-1])
    capsys.readouterr()
    preds = tmp_path / "preds.jsonl"
    assert main(["evaluate", "--checkpoint", str(run), "--json", "--predictions", str(preds)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_examples"] == 6 and {"exact_match", "bleu4", "cider"} <= set(summary)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    expected = [json.loads(line) for line in (scenes / "test.jsonl").read_text().splitlines()]
    assert [r["image"].endswith(e["image"]) for r, e in zip(rows, expected, strict=True)] == [True] * 6
    assert [r["references"] for r in rows] == [[e["caption"]] for e in expected]
    assert main(["evaluate", "--checkpoint", str(run), "--num-beams", "2"]) == 0
    assert "bleu4" in capsys.readouterr().out

    figure = tmp_path / "attn.png"
    image = scenes / expected[0]["image"]
    assert main(["predict", "--checkpoint", str(run), "--image", str(image), "--json",
                 "--attention-map", str(figure)]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    texts, _ = model.generate(torch.from_numpy(__import__("numpy").array(
        Image.open(image).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))).permute(2, 0, 1)[None])
    assert out["prediction"] == texts[0]
    assert figure.is_file() and figure.stat().st_size > 1000
    assert main(["predict", "--checkpoint", str(run), "--image", str(image), "--strategy", "sample",
                 "--top-k", "3", "--seed", "1"]) == 0


def test_word_attention_figure_has_one_panel_per_word(run, tmp_path, monkeypatch):
    from mmfuse import caption_figures

    model = PretrainedModel.from_pretrained(run)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    _, out = model.generate(image[None], need_weights=True, max_new_tokens=5, eos=None)
    grids = caption_figures.word_attention_grids(model, out.attention[0])
    assert grids.shape == (5, 4, 4) and torch.allclose(grids.sum(dim=(1, 2)), torch.ones(5))
    titles = []
    monkeypatch.setattr("matplotlib.axes.Axes.set_title", lambda self, t, **kw: titles.append(t))
    caption_figures.plot_word_attention(model, image, out.tokens[0].tolist(), out.attention[0], tmp_path / "a.png")
    assert titles[0] == "image" and len(titles) == 6


def test_vqa_generate(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["train", "--task", "vqa-generate", "--data", str(data), "--out", str(out), *TINY]) == 0
    model = PretrainedModel.from_pretrained(out)
    assert model.model_type == "answer-generator"
    assert tasks.for_model(model).name == "vqa-generate"
    capsys.readouterr()
    preds = tmp_path / "p.jsonl"
    assert main(["evaluate", "--checkpoint", str(out), "--json", "--predictions", str(preds)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_examples"] == 24 and 0 <= summary["accuracy"] <= 1
    first = json.loads(preds.read_text().splitlines()[0])
    assert set(first) == {"image", "question", "answer", "prediction"}
    assert main(["predict", "--checkpoint", str(out), "--image", str(data / "images/0000.png"),
                 "--question", "what shape is it?"]) == 0


def test_caption_task_defaults_are_its_recipe(monkeypatch, scenes, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(cfg, **kwargs):
        seen.update(cfg.to_dict())
        raise Stop

    monkeypatch.setattr("mmfuse.train.Trainer", fake_trainer)
    with pytest.raises(Stop):
        main(["train", "--task", "caption", "--data", str(scenes), "--out", str(tmp_path / "r"), "--epochs", "2"])
    recipe = tasks.create("caption").train_defaults
    assert seen["epochs"] == 2 and seen["lr"] == recipe["lr"] and seen["images_per_batch"] == recipe["images_per_batch"]


def test_one_line_errors(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "caption", "--out", str(tmp_path / "r"), *TINY])
    assert e.value.code == 2 and "not a caption dataset directory" in capsys.readouterr().err
    vqa = tmp_path / "vqa"
    assert main(["train", "--data", str(make_tiny_dataset(tmp_path / "tiny")), "--out", str(vqa), *TINY]) == 0
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint", str(vqa), "--num-beams", "2"])
    assert "generates nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(vqa), "--image", str(tmp_path / "tiny/images/0000.png")])
    assert "is a VQA model: pass --image and --question" in capsys.readouterr().err


def test_a_caption_model_is_served_over_http(run, scenes):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmfuse.models import Captioner
    from mmfuse.serve import CaptionAdapter, create_app, load_adapter

    adapter = load_adapter(run)
    assert isinstance(adapter, CaptionAdapter) and adapter.kind == "caption" and not adapter.needs_question
    image = scenes / json.loads((scenes / "test.jsonl").read_text().splitlines()[0])["image"]
    model = Captioner.from_pretrained(run)
    with TestClient(create_app(adapter)) as client:
        assert client.get("/healthz").json()["kind"] == "caption"
        r = client.post("/v1/predict", files={"image": image.read_bytes()}, data={"attention": "true"})
        assert r.status_code == 200, r.text
        body = r.json()
    # the server answers what the model generates for the same image (decoded at the model's size)
    from mmfuse.data import load_image

    expected, _ = model.generate(load_image(image, model.config.image_size)[None])
    assert body["caption"] == expected[0]
    assert body["attention_png"]  # one panel per generated word


def test_caption_and_vqa_generate_with_a_frozen_hf_lm(scenes, tmp_path, capsys):
    """``--lm hf:PATH``: the tiny GPT-2 decodes, gated cross-attention reads the image; train, predict, evaluate."""
    pytest.importorskip("transformers")
    from mmfuse.data import load_image
    from mmfuse.data.captions import CAPTION_COLORS, CAPTION_SHAPES
    from tests.tiny_hf import save_gpt2

    words = ["a", "small", "large", *CAPTION_COLORS, *CAPTION_SHAPES, ",", "and", "yes", "no"]
    lm = save_gpt2(tmp_path / "gpt2", words)
    out = tmp_path / "run"
    assert main(["train", "--task", "caption", "--data", str(scenes), "--out", str(out), "--lm", f"hf:{lm}",
                 "--lm-every", "1", *TINY]) == 0
    model = PretrainedModel.from_pretrained(out)
    assert model.model_type == "captioner" and model.config.lm == str(lm) and len(model.lm.xattn) == 2
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= metrics["test_exact_match"] <= 1.0 and metrics["train_loss"] == metrics["train_loss"]  # not NaN
    image = scenes / json.loads((scenes / "test.jsonl").read_text().splitlines()[0])["image"]
    capsys.readouterr()
    figure = tmp_path / "words.png"
    assert main(["predict", "--checkpoint", str(out), "--image", str(image), "--json", "--attention-map",
                 str(figure)]) == 0
    prediction = json.loads(capsys.readouterr().out.splitlines()[0])["prediction"]
    texts, _ = model.generate(load_image(image, model.config.image_size)[None])
    assert isinstance(prediction, str) and prediction == texts[0]
    assert figure.stat().st_size > 1000  # the gated blocks' attention, one panel per word

    data = make_tiny_dataset(tmp_path / "tiny")
    assert main(["train", "--task", "vqa-generate", "--data", str(data), "--out", str(tmp_path / "vqa"), "--lm",
                 f"hf:{lm}", *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "vqa"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 24
    assert main(["predict", "--checkpoint", str(tmp_path / "vqa"), "--image", str(data / "images/0000.png"),
                 "--question", "what shape is it?"]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--lm", f"hf:{lm}", *TINY])
    assert "--lm: not a setting of the vqa task's model" in capsys.readouterr().err
