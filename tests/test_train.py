"""The trainer: learning on real data, schedules, parameter groups, checkpoints and exact resume."""

from __future__ import annotations

import json
import math

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


def test_nan_loss_before_any_checkpoint_says_none_was_written(tiny, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tiny, tmp_path / "run", epochs=1))
    monkeypatch.setattr(trainer.model.head, "forward", lambda x: x[:, :1].expand(-1, 6) * float("nan"))
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1 .*no checkpoint was written yet"):
        trainer.fit()


def test_weight_decay_rule_exempts_biases_norms_positions_modality_embeddings_and_gates(tiny, tmp_path):
    model_options = {**TINY_MODEL, "fusion": "gated_cross_attention", "pool_queries": 4}
    trainer = Trainer(_cfg(tiny, tmp_path / "run", model=model_options, weight_decay=0.1))
    decay = {id(p): g["weight_decay"] for g in param_groups(trainer.model, trainer.cfg) for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    decayed = sorted(n for n, p in named.items() if decay[id(p)] > 0)
    exempt = sorted(n for n, p in named.items() if decay[id(p)] == 0)
    for name in ("vision.pos_embed.row", "vision.pos_embed.col", "text.pos", "pool.latents"):
        assert name in exempt, name
    assert any("gate" in n for n in exempt)
    assert all(not n.endswith(".bias") for n in decayed)
    assert all(named[n].dim() >= 2 for n in decayed)
    assert "text.embed.weight" in decayed and "head.4.weight" in decayed
    assert any(n.startswith("vision.blocks") and named[n].dim() == 4 for n in decayed)  # conv kernels
    # every decayed tensor is the weight of a linear, convolution or embedding layer
    for n in decayed:
        module = trainer.model.get_submodule(n.rsplit(".", 1)[0])
        assert isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)), n


def test_modality_embeddings_are_not_decayed(tiny, tmp_path):
    trainer = Trainer(_cfg(tiny, tmp_path / "run", model={**TINY_MODEL, "fusion": "self_attention"}))
    decay = {id(p): g["weight_decay"] for g in param_groups(trainer.model, trainer.cfg) for p in g["params"]}
    names = [n for n, p in trainer.model.named_parameters() if "modality" in n]
    assert names and all(decay[id(p)] == 0 for n, p in trainer.model.named_parameters() if n in names)


def test_trainer_on_an_explicit_device_checkpoints_its_precision(tiny, tmp_path):
    trainer = Trainer(_cfg(tiny, tmp_path / "run", epochs=1, precision="bf16"), device="cpu")
    assert trainer.device == torch.device("cpu") and trainer.precision == "bf16"
    trainer.fit()
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    again = Trainer(_cfg(tiny, tmp_path / "run", epochs=2, precision="bf16"), resume=True, device="cpu")
    assert again.precision == "bf16"


def test_bf16_flag_is_an_alias_of_precision_bf16():
    assert TrainConfig(bf16=True).precision == "bf16"
    with pytest.raises(ValueError, match="contradicts"):
        TrainConfig(bf16=True, precision="fp32")


def test_precision_auto_keeps_the_faster_of_fp32_and_bf16_and_remembers_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("mmfuse.train.cpu_bf16_support", lambda: "avx512_bf16")
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    timed = []
    for fast in ("fp32", "bf16"):
        def timing(self, precisions, fast=fast):
            timed.extend(precisions)
            return {p: 1.0 if p == fast else 2.0 for p in precisions}

        monkeypatch.setattr(Trainer, "_time_steps", timing)
        seed = 0 if fast == "fp32" else 1  # another model setting: measured anew
        assert Trainer(_cfg(tiny, tmp_path / fast, model={**TINY_MODEL, "dim": 32 + 16 * seed})).precision == fast
    assert timed == ["fp32", "bf16", "fp32", "bf16"]
    # The same settings again: the earlier choice, without timing.
    assert Trainer(_cfg(tiny, tmp_path / "again", model={**TINY_MODEL, "dim": 48})).precision == "bf16"
    assert len(timed) == 4


def test_precision_auto_takes_bf16_only_for_a_clear_gain(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("mmfuse.train.cpu_bf16_support", lambda: "amx")
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    for bf16_time, chosen in ((0.9, "fp32"), (0.7, "bf16")):
        monkeypatch.setattr(Trainer, "_time_steps", lambda self, precisions, t=bf16_time: {"fp32": 1.0, "bf16": t})
        cfg = _cfg(tiny, tmp_path / chosen, model={**TINY_MODEL, "dim": 32 if chosen == "fp32" else 48})
        assert Trainer(cfg).precision == chosen


def test_timing_the_precisions_leaves_weights_and_rng_untouched(tiny, tmp_path):
    trainer = Trainer(_cfg(tiny, tmp_path / "run"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}  # BatchNorm statistics included
    rng = torch.get_rng_state()
    timings = trainer._time_steps(("fp32", "bf16"), batches=2)
    assert set(timings) == {"fp32", "bf16"} and all(0 < t < math.inf for t in timings.values())
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_mid_epoch_checkpoint_refuses_another_process_count(tiny, tmp_path):
    trainer = Trainer(_cfg(tiny, tmp_path / "run"))
    trainer.pos.step_in_epoch = 1
    trainer.world = 2  # as if written by rank 0 of two processes
    trainer.save_checkpoint()
    trainer.close()
    with pytest.raises(CheckpointError, match="mid-epoch with 2 process"):
        Trainer(_cfg(tiny, tmp_path / "run"), resume=True)
