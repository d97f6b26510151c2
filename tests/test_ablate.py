from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from mmfuse.ablate import COLUMNS, run_ablation
from mmfuse.report import write_report
from tests.tiny_data import make_tiny_dataset

TINY_MODEL = {"cnn_stages": [[8], [16]], "dim": 32, "text_dim": 32, "num_heads": 2, "image_size": 32}
FUSIONS = ["cross_attention", "concat", "attention_pooling"]  # not sorted: the order given is kept

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    return make_tiny_dataset(tmp_path / "data")


def test_ablation_writes_one_row_per_fusion(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    rows = run_ablation(data=str(data), fusions=FUSIONS, epochs=1, seed=3, out_dir=out,
                        base={"images_per_batch": 8, "model": TINY_MODEL})
    assert [r["fusion"] for r in rows] == FUSIONS
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["params"] > 0
        assert r["seconds_per_epoch"] > 0
        assert r["train_questions_per_second"] > 0
        assert r["inference_questions_per_second"] > 0
        run = out / r["fusion"]
        assert json.loads((run / "config.json").read_text())["fusion"] == r["fusion"]
        settings = json.loads((run / "run.json").read_text())
        assert (settings["seed"], settings["epochs"], settings["images_per_batch"]) == (3, 1, 8)
        # the trainer's own end-of-training evaluation agrees with the ablation's
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert r["test_accuracy"] == pytest.approx(metrics[-1]["test_accuracy"])
        assert r["seconds_per_epoch"] == pytest.approx(metrics[-1]["seconds"])
    params = {r["fusion"]: r["params"] for r in rows}
    assert len(set(params.values())) == 3  # same encoders, different fusions: different sizes

    md = (out / "results.md").read_text().splitlines()
    assert f"`{data}`" in md[0] and "1 epoch," in md[0] and "seed 3" in md[0] and "1 CPU thread." in md[0]
    table = [line for line in md if line.startswith("| ") and not line.startswith("| fusion")]
    assert [line.split("|")[1].strip() for line in table] == FUSIONS

    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["fusion"] for r in csv_rows] == FUSIONS
    assert list(csv_rows[0]) == COLUMNS
    assert [int(r["params"]) for r in csv_rows] == [params[f] for f in FUSIONS]

    with Image.open(out / "results.png") as im:
        assert im.format == "PNG"
        im.verify()

    # a run without attention still gets a report, with a note instead of maps
    text = write_report(out / "concat").read_text()
    assert "fusion concat has no attention to show" in text
    assert not list((out / "concat" / "figures").glob("attention_*.png"))


@pytest.mark.parametrize("base, match", [({"epochs": 5}, "epochs"),
                                         ({"model": {"fusion": "concat"}}, "fusion")])
def test_base_cannot_override_the_shared_settings(base: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        run_ablation(data="unused", fusions=["concat"], epochs=1, out_dir=tmp_path, base=base)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fusions", [[], ["concat", "nope"], ["concat", "concat"]])
def test_bad_fusion_lists_fail_before_training(fusions: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fusions"):
        run_ablation(data="unused", fusions=fusions, epochs=1, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())
