"""The trainer: learning on real data, schedules, parameter groups, checkpoints and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmfuse.data import load_split, majority_answer_accuracy
from mmfuse.io import CheckpointError
from mmfuse.models import VQAModel
from mmfuse.train import TrainConfig, Trainer, TrainingDiverged, lr_factor, param_groups, resume
from tests.tiny_data import make_tiny_dataset

TINY_MODEL = {"cnn_stages": [[8], [16]], "dim": 32, "text_dim": 32, "num_heads": 2, "text_heads": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_images=24, size=32)


def _cfg(tiny, out, **kw) -> TrainConfig:
    base = {"data": str(tiny), "out": str(out), "epochs": 2, "images_per_batch": 4, "progress": False,
            "warmup_steps": 2, "model": dict(TINY_MODEL), "eval_every": 0}
    base.update(kw)
    return TrainConfig(**base)


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def test_learns_easy_vqa_well_above_the_majority_answer(tmp_path):
    """A few hundred steps of a small CNN on a slice of easy-VQA (400 train / 200 test images)."""
    train = load_split("easy-vqa", "train").first_images(400)
    test = load_split("easy-vqa", "test").first_images(200)
    majority = majority_answer_accuracy(train, test)
    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=12, images_per_batch=16, progress=False, warmup_steps=20,
                      lr=3e-3, eval_every=0,
                      model={"cnn_stages": [[16], [32], [32]], "dim": 32, "text_dim": 32, "num_heads": 4,
                             "fusion": "cross_attention", "depth": 1})
    metrics = Trainer(cfg, train_split=train, eval_split=test).fit()
    assert metrics["step"] >= 300
    assert metrics["test_accuracy"] > majority + 0.3, (metrics["test_accuracy"], majority)


def test_lr_schedules():
    cfg = TrainConfig(epochs=4, warmup_steps=10, schedule="cosine")
    assert lr_factor(cfg, 0, 25) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 25) == pytest.approx(1.0)
    assert lr_factor(cfg, 99, 25) == pytest.approx(0.0, abs=1e-3)
    assert 0.4 < lr_factor(cfg, 55, 25) < 0.6
    step = TrainConfig(epochs=9, warmup_steps=0, schedule="step", step_epochs=3, step_gamma=0.1)
    assert [lr_factor(step, e * 10, 10) for e in (0, 2, 3, 6)] == pytest.approx([1, 1, 0.1, 0.01])


def test_attention_parameters_get_their_own_learning_rate(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, attention_lr_mult=5.0)
    trainer = Trainer(cfg)
    groups = param_groups(trainer.model, cfg)
    attention = {id(p) for m in trainer.model.modules() if type(m).__name__ == "CrossAttention"
                 for p in m.parameters()}
    for g in groups:
        in_attention = {id(p) in attention for p in g["params"]}
        assert len(in_attention) == 1, "a group mixes attention and other parameters"
        assert g["lr_mult"] == (5.0 if in_attention.pop() else 1.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in trainer.model.parameters())
    biases = [g for g in groups if any(p.dim() == 1 for p in g["params"])]
    assert all(g["weight_decay"] == 0.0 for g in biases)


def test_run_directory_holds_a_loadable_model(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "run", eval_every=1)
    metrics = Trainer(cfg).fit()
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "vocab.json", "run.json", "state.safetensors"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "test_accuracy" in rows[0] and 0.0 <= rows[-1]["test_accuracy"] <= 1.0
    assert metrics["epoch"] == 2
    model = VQAModel.from_pretrained(run)
    assert model.config.fusion == "fusion_transformer"  # the default
    assert model.answers.names == sorted({"red", "blue", "square", "circle", "yes", "no"})
    assert not list(run.glob("*.tmp")), "temporary files left behind"


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, steps: int) -> None:
    original = Trainer.train_step
    count = {"n": 0}

    def step(self, batch):
        if count["n"] == steps:
            raise _Crash
        count["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_resume_ends_exactly_as_an_uninterrupted_run(tiny, tmp_path, monkeypatch, checkpoint_every):
    extra = {"checkpoint_every": checkpoint_every, "model": {**TINY_MODEL, "dropout": 0.2}, "epochs": 3}
    Trainer(_cfg(tiny, tmp_path / "straight", **extra)).fit()

    with monkeypatch.context() as m:
        _crash_after(m, 7)  # 4 batches an epoch: dies in epoch 2, after a mid-epoch checkpoint if any
        with pytest.raises(_Crash):
            Trainer(_cfg(tiny, tmp_path / "resumed", **extra)).fit()
    resume(tmp_path / "resumed", progress=False)

    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("straight", "resumed")]
    strip = [[{k: v for k, v in json.loads(r).items() if k not in ("seconds", "questions_per_second")} for r in rs]
             for rs in rows]
    assert strip[0] == strip[1]


def test_truncated_state_gives_a_one_line_error_naming_the_file(tiny, tmp_path):
    Trainer(_cfg(tiny, tmp_path / "run", epochs=1)).fit()
    state = tmp_path / "run" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state\.safetensors"):
        resume(tmp_path / "run", progress=False)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    Trainer(_cfg(tiny, tmp_path / "run", epochs=1)).fit()
    before = _weights(tmp_path / "run")
    trainer = Trainer(_cfg(tiny, tmp_path / "run", epochs=2), resume=True)
    original = trainer.model.head.forward
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        out = original(x)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(trainer.model.head, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2"):
        trainer.fit()
    after = _weights(tmp_path / "run")
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
