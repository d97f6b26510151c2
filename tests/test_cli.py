"""The ``mmfuse`` command end to end on a tiny dataset: train -> evaluate -> predict -> ablate, errors, DDP."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmfuse.cli import main
from mmfuse.models import VQAModel
from tests.tiny_data import make_tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--image-size", "32", "--dim", "32", "--num-heads", "2", "--images-per-batch", "4", "--threads", "1",
        "--no-progress", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "xattn"
    assert main(["train", "--data", str(tiny), "--out", str(out), "--epochs", "2", "--fusion", "cross_attention",
                 *TINY]) == 0
    return out


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmfuse.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_train_writes_a_run_directory(run):
    for name in ("config.json", "model.safetensors", "vocab.json", "run.json", "state.safetensors",
                 "metrics.jsonl"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_evaluate_json_and_predictions(run, tmp_path, capsys):
    predictions = tmp_path / "pred.jsonl"
    confusion = tmp_path / "confusion.png"
    assert main(["evaluate", "--checkpoint", str(run), "--json", "--predictions", str(predictions),
                 "--confusion", str(confusion)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_examples"] == 24  # 8 test images x 3 questions
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert set(summary["accuracy_by_answer_type"]) == {"color", "shape", "yes/no"}
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 24
    assert {"question", "answer", "prediction"} <= set(lines[0])
    assert sum(r["prediction"] == r["answer"] for r in lines) / 24 == pytest.approx(summary["accuracy"])
    Image.open(confusion).verify()


def test_predict_prints_top5_and_writes_an_attention_map(run, tiny, tmp_path, capsys):
    out = tmp_path / "attn.png"
    image = tiny / "images" / "0020.png"
    assert main(["predict", "--checkpoint", str(run), "--image", str(image), "--question", "what shape is it?",
                 "--attention-map", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    model = VQAModel.from_pretrained(run)
    assert result["answer"] in model.answers.names
    probs = [p for _, p in result["top5"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    Image.open(out).verify()


def test_ablate_writes_the_table(tiny, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(["ablate", "--data", str(tiny), "--fusions", "concat,cross_attention", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    table = (out / "results.md").read_text()
    assert "concat" in table and "cross_attention" in table
    assert (out / "results.csv").is_file() and (out / "results.png").is_file()
    assert "cross_attention" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--epochs", "0", "--data", "easy-vqa"], "epochs must be in [1, 100000], got 0"),
    (["train", "--data", "/no/such/dir"], "neither 'easy-vqa' nor a dataset directory"),
    (["evaluate", "--checkpoint", "/no/such/run"], "/no/such/run"),
    (["train", "--resume", "/no/such/run"], "/no/such/run"),
    (["train", "--fusion", "bogus"], "invalid choice: 'bogus'"),
    (["ablate", "--fusions", "concat,bogus", "--epochs", "1"], "unknown fusion(s) ['bogus']"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"mmfuse( \w+)?: error: ", last) and message in last, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_with_a_local_attention_window(tiny, tmp_path, capsys):
    out = tmp_path / "local"
    assert main(["train", "--data", str(tiny), "--out", str(out), "--epochs", "1", "--fusion", "fusion_transformer",
                 "--impl", "local", "--window", "16", "--num-global", "1", "--block-q", "8", *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["impl"], config["window"], config["num_global"], config["block_q"]) == ("local", 16, 1, 8)
    model = VQAModel.from_pretrained(out)
    assert {m.options["window"] for m in model.modules() if type(m).__name__ == "Attention"} == {16}
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 24


@pytest.mark.parametrize(("flags", "message"), [
    (["--impl", "local"], "impl='local' needs window="),
    (["--impl", "lowrank"], "impl='lowrank' needs rank="),
    (["--window", "16"], "window= applies to impl in ['local'], not impl='auto'"),
])
def test_attention_options_that_do_not_fit_the_impl_are_one_line_errors(tiny, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tiny), "--out", str(tmp_path / "run"), "--epochs", "1", *flags, *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_resume_refuses_new_settings(run, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", str(run), "--epochs", "5"])
    assert e.value.code == 2
    assert "drop --epochs" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to this Python")
def test_ddp_with_two_processes_trains_a_usable_model(tiny, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = ["train", "--data", str(tiny), "--epochs", "2", "--fusion", "cross_attention", "--eval-every", "1",
            *[a for a in TINY if a not in ("--threads", "1")]]
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    ddp = tmp_path / "ddp"
    with socket.socket() as s:  # a port no other process listens on
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "mmfuse.cli",
                           *args, "--out", str(ddp)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    rows = {name: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for name, d in (("single", single), ("ddp", ddp))}
    assert [r["epoch"] for r in rows["ddp"]] == [r["epoch"] for r in rows["single"]] == [1, 2]
    # Each rank takes half of the images per step: half the steps, and losses of the same size.
    assert rows["ddp"][-1]["step"] * 2 == rows["single"][-1]["step"]
    for a, b in zip(rows["ddp"], rows["single"], strict=True):
        assert 0.3 < a["train_loss"] / b["train_loss"] < 3
    weights = load_file(str(ddp / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    model = VQAModel.from_pretrained(ddp)
    probs = model.answer(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["what shape is it?"])
    assert probs.shape == (1, len(model.answers)) and torch.isfinite(probs).all()


def test_make_dataset_writes_a_loadable_relational_dataset(tmp_path, capsys):
    from mmfuse.data import load_split

    out = tmp_path / "rel"
    assert main(["make-dataset", "relational", "--out", str(out), "--train-images", "12", "--test-images", "4",
                 "--image-size", "32"]) == 0
    assert str(out) in capsys.readouterr().out
    split = load_split(out, "test", image_size=32)
    assert split.images.shape[0] == 4 and len(split) > 0
    assert {"relational", "non-relational"} <= set(split.answer_types)


def test_version_and_help_show_every_flag_with_help_and_defaults(capsys):
    from mmfuse import __version__
    from mmfuse.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"mmfuse {name} {action.option_strings[0]} has no help text"
    text = subparsers["train"].format_help()
    for expected in ("(default: fusion_transformer)", "(default: 10)", "(default: cosine)", "--precision",
                     "--device", "--eval-split"):
        assert expected in text, expected
    assert "(default: None)" not in text


def test_train_json_and_eval_split(tiny, tmp_path, capsys):
    data = tmp_path / "with_val"
    shutil.copytree(tiny, data)
    shutil.copy(data / "test.jsonl", data / "val.jsonl")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--fusion", "concat",
                 "--eval-split", "val", "--json", "--device", "cpu", *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epoch"] == 1 and 0 <= result["val_accuracy"] <= 1 and "val_num_examples" in result


@pytest.mark.parametrize("flags", [["--num-heads", "4"], ["--impl", "math"], ["--lr", "0.1"],
                                   ["--precision", "bf16"], ["--hf-finetune"], ["--text", "transformer"]])
def test_resume_refuses_every_setting_it_would_ignore(run, capsys, flags):
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", str(run), *flags])
    assert e.value.code == 2
    assert f"drop {flags[0]}" in capsys.readouterr().err


def test_resume_accepts_where_it_runs(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", "--resume", str(copy), "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    assert "model saved in" in capsys.readouterr().out


def test_evaluate_on_an_explicit_device(run, capsys):
    assert main(["evaluate", "--checkpoint", str(run), "--device", "cpu", "--precision", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 24
