"""The classify task end to end: data with a context, training, evaluation, predict, ablation, report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mmfuse import tasks
from mmfuse.ablate import CLASSIFY_COLUMNS, run_classify_ablation
from mmfuse.cli import main
from mmfuse.data.context_shapes import write_context_dataset
from mmfuse.presets import PRESETS
from mmfuse.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"width": 0.125, "num_heads": 2, "context_dim": 16, "image_size": 32}
FLAGS = ["--width", "0.125", "--num-heads", "2", "--context-dim", "16", "--image-size", "32",
         "--images-per-batch", "8", "--threads", "1", "--no-progress", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    return write_context_dataset(tmp_path_factory.mktemp("ctx") / "text", num_train_images=6, num_test_images=2,
                                 image_size=32, num_objects=3, seed=0)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    return write_context_dataset(tmp_path_factory.mktemp("ctx") / "image", num_train_images=6, num_test_images=2,
                                 image_size=32, num_objects=3, context="image", seed=0)


@pytest.fixture(scope="module")
def text_run(text_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "text"
    assert main(["train", "--task", "classify", "--data", str(text_data), "--out", str(out), "--epochs", "1",
                 "--levels", "2,3,4,5", *FLAGS]) == 0
    return out


@pytest.mark.parametrize("kind", ["text", "image"])
def test_task_trains_a_few_steps_and_evaluates(kind, text_data, image_data, tmp_path):
    data = text_data if kind == "text" else image_data
    cfg = TrainConfig(task="classify", data=str(data), out=str(tmp_path / "run"), epochs=2, images_per_batch=6,
                      warmup_steps=1, threads=1, progress=False, model=TINY)
    row = train(cfg)
    assert row["epoch"] == 2 and row["test_num_examples"] == 6
    assert 0.0 <= row["test_accuracy"] <= 1.0
    assert set(row["test_accuracy_by_label"]) <= {"square", "circle", "triangle", "cross"}
    task = tasks.create("classify")
    model = task.load_model(tmp_path / "run")
    assert model.config.context == kind  # read from the data
    assert tasks.for_model(model).name == "classify"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]  # 18 training examples in batches of 6


def test_batches_are_deterministic_and_resumable(text_data):
    task = tasks.create("classify")
    split = task.load_split(str(text_data), "train", image_size=32)
    model = task.build_model(TINY, split)
    batches = task.batches(model, split, batch_size=4, seed=1)
    full = [b.example_ids.tolist() for b in batches.epoch(3)]
    assert [b.example_ids.tolist() for b in batches.epoch(3, start=2)] == full[2:]
    assert sorted(i for ids in full for i in ids) == list(range(len(split)))
    assert full != [b.example_ids.tolist() for b in batches.epoch(4)]
    halves = [task.batches(model, split, batch_size=4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    ids = [{i for b in h.epoch(0) for i in b.example_ids.tolist()} for h in halves]
    assert not ids[0] & ids[1] and len(halves[0]) == len(halves[1])


def test_resnet_baseline_ignores_the_context(text_data, tmp_path):
    task = tasks.create("classify")
    split = task.load_split(str(text_data), "train", image_size=32)
    model = task.build_model({**TINY, "backbone": "resnet18"}, split)
    assert model.config.context == "none" and model.text is None
    with pytest.raises(ValueError, match="has 'text' contexts"):
        task.build_model({**TINY, "context": "image"}, split)


def test_cli_evaluate_predict_and_attention_map(text_run, text_data, tmp_path, capsys):
    capsys.readouterr()
    preds = tmp_path / "p.jsonl"
    confusion = tmp_path / "c.png"
    assert main(["evaluate", "--checkpoint", str(text_run), "--json", "--predictions", str(preds),
                 "--confusion", str(confusion)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert confusion.stat().st_size > 0
    assert summary["num_examples"] == 6 and set(summary) >= {"accuracy", "accuracy_by_label"}
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 6 and {"image", "context", "label", "prediction", "correct"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 6 == pytest.approx(summary["accuracy"])

    line = json.loads((text_data / "test.jsonl").read_text().splitlines()[0])
    png = tmp_path / "att.png"
    assert main(["predict", "--checkpoint", str(text_run), "--image", str(text_data / line["image"]),
                 "--context", line["context"], "--attention-map", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] in {"square", "circle", "triangle", "cross"} and len(out["top5"]) == 4
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        main(["predict", "--checkpoint", str(text_run), "--image", str(text_data / line["image"])])
    assert e.value.code == 2 and "pass --context" in capsys.readouterr().err


def test_level_attention_has_one_map_per_level(text_run, text_data):
    from mmfuse.classify_report import level_attention, write_report

    task = tasks.create("classify")
    model = task.load_model(text_run)
    split = task.load_split(str(text_data), "test", image_size=32)
    att = level_attention(model, split.images[0], context=split.contexts[0])
    assert sorted(att.maps) == [2, 3, 4, 5]
    assert {lv: tuple(m.shape) for lv, m in att.maps.items()} == {2: (8, 8), 3: (4, 4), 4: (2, 2), 5: (1, 1)}
    assert all(t in {"<cls>", "the", "object", "red", "green", "blue", "orange", "gray", "yellow"}
               for t in att.tokens.values())
    report = write_report(text_run).read_text()
    assert "## Attention maps" in report and (text_run / "figures" / "attention_0.png").is_file()


def test_robustness_perturbs_images_and_text_contexts(text_run, text_data, tmp_path, capsys):
    assert main(["robustness", "--checkpoint", str(text_run), "--out", str(tmp_path / "rob")]) == 0
    report = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    results = report["models"][0]["results"]
    assert {"gaussian_noise", "occlusion", "typos"} <= set(results)
    assert all(len(r["accuracy"]) == 6 for r in results.values())


def test_ablation_writes_the_table_with_the_seed_columns(image_data, tmp_path):
    out = tmp_path / "abl"
    variants = ["vgg16", "vgg16-xattn", "vgg16-multilevel", "resnet18"]
    rows = run_classify_ablation(data=str(image_data), variants=variants, epochs=1, seed=2, out_dir=out,
                                 base={"images_per_batch": 9, "threads": 1, "model": {"width": 0.125,
                                                                                      "image_size": 32}})
    assert [r["variant"] for r in rows] == variants
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == CLASSIFY_COLUMNS and CLASSIFY_COLUMNS[:4] == ["variant", "accuracy", "params",
                                                                             "seconds_per_epoch"]
    assert [r["variant"] for r in table] == variants
    for r in table:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and int(r["params"]) > 0 and float(r["seconds_per_epoch"]) > 0
    params = {r["variant"]: int(r["params"]) for r in table}
    assert params["vgg16-xattn"] > params["vgg16"]  # attention and the context encoder cost parameters
    configs = {v: json.loads((out / v / "config.json").read_text()) for v in variants}
    assert configs["vgg16"]["context"] == "none" and configs["vgg16-xattn"]["context"] == "image"
    assert configs["vgg16-multilevel"]["levels"] == [2, 3, 4, 5] and configs["resnet18"]["backbone"] == "resnet18"
    assert "| variant | accuracy | params |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0


def test_cli_ablate_classify_with_the_seed_recipe(image_data, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--task", "classify", "--data", str(image_data), "--variants", "vgg16-xattn-8h",
                 "--recipe", "seed003", "--epochs", "1", "--width", "0.125", "--image-size", "32",
                 "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    assert "vgg16-xattn-8h" in capsys.readouterr().out
    settings = json.loads((out / "vgg16-xattn-8h" / "run.json").read_text())
    for key, value in PRESETS["seed003"].items():
        assert settings[key] == value
    assert json.loads((out / "vgg16-xattn-8h" / "config.json").read_text())["num_heads"] == 8


def test_train_and_ablate_start_from_the_task_recipe(text_data, tmp_path):
    lr = tasks.create("classify").train_defaults["lr"]
    assert lr != TrainConfig.__dataclass_fields__["lr"].default  # the classify task's own learning rate
    assert main(["train", "--task", "classify", "--data", str(text_data), "--out", str(tmp_path / "r"),
                 "--epochs", "1", *FLAGS]) == 0
    assert json.loads((tmp_path / "r" / "run.json").read_text())["lr"] == lr
    assert main(["ablate", "--task", "classify", "--data", str(text_data), "--variants", "vgg16-xattn-mlp",
                 "--epochs", "1", "--width", "0.125", "--image-size", "32", "--threads", "1",
                 "--out", str(tmp_path / "abl"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "abl" / "vgg16-xattn-mlp" / "run.json").read_text())["lr"] == lr
    assert json.loads((tmp_path / "abl" / "vgg16-xattn-mlp" / "config.json").read_text())["mlp_ratio"] == 4.0


def test_train_recipe_is_overridden_by_flags(text_data, tmp_path):
    out = tmp_path / "r"
    assert main(["train", "--task", "classify", "--data", str(text_data), "--out", str(out), "--epochs", "1",
                 "--recipe", "seed003", "--lr", "0.05", *FLAGS]) == 0
    settings = json.loads((out / "run.json").read_text())
    assert settings["optimizer"] == "sgd" and settings["schedule"] == "step" and settings["lr"] == 0.05
    assert settings["attention_lr_mult"] == PRESETS["seed003"]["attention_lr_mult"]


def test_make_dataset_context_via_the_cli(tmp_path, capsys):
    out = tmp_path / "ctx"
    assert main(["make-dataset", "context", "--out", str(out), "--train-images", "3", "--test-images", "1",
                 "--image-size", "32", "--objects", "2", "--context", "image"]) == 0
    assert "--task classify" in capsys.readouterr().out
    line = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert set(line) == {"image", "context_image", "label"} and (out / line["context_image"]).is_file()
