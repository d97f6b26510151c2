"""``make-dataset sort-of-clevr`` -> ``train --preset sort-of-clevr`` -> ``evaluate`` per question kind."""

from __future__ import annotations

import copy
import json

import pytest

from mmfuse.cli import main
from mmfuse.models import VQAModel
from mmfuse.presets import PRESETS, apply_preset
from mmfuse.train import TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def test_preset_sets_the_recipe_and_flags_override_it():
    before = copy.deepcopy(PRESETS)
    train, model = apply_preset("sort-of-clevr", {"epochs": 1}, {"dim": 16, "fusion": "film"})
    assert train["epochs"] == 1 and model["dim"] == 16 and model["fusion"] == "film"
    assert "fusion_options" not in model  # multi_hop's own arguments do not go to another fusion
    assert apply_preset("sort-of-clevr", {}, {"dim": 16})[1]["fusion_options"] == {"count_unit": 8,
                                                                                   "distance_bias": True}
    assert apply_preset("sort-of-clevr", {"lr": 1e-3}, {})[0]["lr"] == 1e-3
    train, model = apply_preset("sort-of-clevr", {}, {})
    assert train["epochs"] == PRESETS["sort-of-clevr"]["epochs"]
    assert model["fusion"] == "multi_hop" and model["cnn_coordinates"]
    assert PRESETS == before  # applying never modifies the preset itself (it pops "model" from a copy)
    TrainConfig(**train, model=model)  # every key is a real setting
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        apply_preset("nope", {}, {})


def test_make_dataset_train_with_preset_evaluate_by_kind(tmp_path, capsys):
    data, run = tmp_path / "soc", tmp_path / "run"
    assert main(["make-dataset", "sort-of-clevr", "--out", str(data), "--train-images", "8", "--test-images", "3",
                 "--image-size", "48", "--object-radius", "3", "--seed", "1", "--background", "0,0,0"]) == 0
    assert json.loads((data / "objects.json").read_text())["background"] == [0, 0, 0]
    assert str(data) in capsys.readouterr().out
    assert main(["train", "--preset", "sort-of-clevr", "--data", str(data), "--out", str(run), "--epochs", "1",
                 "--image-size", "32", "--dim", "16", "--num-heads", "2", "--threads", "1", "--no-progress",
                 "--warmup-steps", "1", "--images-per-batch", "4",
                 "--depth", "3", "--fusion-options", '{"coordinates": false, "distance_bias": true}']) == 0
    capsys.readouterr()
    model = VQAModel.from_pretrained(run)
    assert model.config.fusion == PRESETS["sort-of-clevr"]["model"]["fusion"]
    assert model.config.dim == 16 and model.config.image_size == 32  # flags over the preset
    assert model.config.fusion_options == {"coordinates": False, "distance_bias": True}
    assert model.config.cnn_coordinates
    reader = model.fusion.reader
    assert reader.hops == 3 and reader.coord_keys is None and len(reader.distance_scale) == 2  # hops 2 and 3
    assert main(["evaluate", "--checkpoint", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_examples"] == 60
    by_kind = summary["accuracy_by_kind"]
    assert set(by_kind) == {"relational", "non-relational"}
    assert summary["accuracy"] == pytest.approx(sum(by_kind.values()) / 2)  # 30 questions of each kind
    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    assert "relational" in capsys.readouterr().out


def test_background_must_be_three_bytes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["make-dataset", "sort-of-clevr", "--out", str(tmp_path / "x"), "--background", "0,0,300"])
    assert e.value.code == 2
    assert "expected three integers in 0-255 such as 0,0,0, got '0,0,300'" in capsys.readouterr().err


def test_fusion_options_must_be_a_json_object(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--fusion-options", "[1]"])
    assert e.value.code == 2 and "expected a JSON object, got list" in capsys.readouterr().err
