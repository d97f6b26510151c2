"""Perturbations (identity at 0, types kept, deterministic, damage growing with severity) and the report."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmfuse.cli import main
from mmfuse.data import load_split
from mmfuse.evaluate import evaluate
from mmfuse.models import VQAModel
from mmfuse.perturbations import MAX_SEVERITY, PERTURBATIONS
from mmfuse.robustness import (
    area_under_curve,
    evaluate_perturbed,
    perturb_split,
    relative_robustness,
    run_robustness,
)
from mmfuse.train import TrainConfig, Trainer
from tests.tiny_data import make_tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

EPOCHS = 6
TINY_MODEL = {"cnn_stages": [[8], [16]], "dim": 32, "text_dim": 32, "num_heads": 2, "text_heads": 2}
IMAGE = [n for n, p in PERTURBATIONS.items() if p.modality == "image"]
TEXT = [n for n, p in PERTURBATIONS.items() if p.modality == "text"]
# the perturbations that draw from the generator
RANDOM = {"gaussian_noise", "rotation", "occlusion", "typos", "word_drop", "word_swap"}
SEVERITIES = range(MAX_SEVERITY + 1)
QUESTIONS = [
    "what color is the shape?", "what shape is in the image?", "is there a red shape?",
    "does the image contain a blue circle near the top left corner?", "why?", "Is it GREEN, or not?",
    "¿qué forma tiene la figura?", "how many sides does the polygon in the middle of the picture have?",
] * 6


def _images(m: int = 16, size: int = 32) -> torch.Tensor:
    """(m, 3, size, size) uint8: smooth random colour fields, each with one sharp dark square."""
    g = torch.Generator().manual_seed(123)
    x = F.interpolate(torch.rand(m, 3, 4, 4, generator=g), size=(size, size), mode="bilinear") * 200 + 30
    for i in range(m):
        y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        x[i, :, y0:y0 + size // 3, x0:x0 + size // 3] = 10.0
    return x.round().to(torch.uint8)


def _apply(name, x, severity, seed=0):
    return PERTURBATIONS[name](x, severity, torch.Generator().manual_seed(seed))


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _damage(name: str, severity: int) -> float:
    if name in IMAGE:
        x = _images()
        return float((_apply(name, x, severity).float() - x.float()).abs().mean())
    out = _apply(name, QUESTIONS, severity)
    return sum(_levenshtein(a, b) for a, b in zip(QUESTIONS, out, strict=True)) / len(QUESTIONS)


def _input(name: str):
    return _images() if name in IMAGE else list(QUESTIONS)


# --------------------------------------------------------------------------------------------------
# the perturbations


def test_registry_covers_both_modalities():
    assert set(IMAGE) == {"gaussian_noise", "blur", "contrast", "rotation", "occlusion"}
    assert set(TEXT) == {"typos", "word_drop", "word_swap"}
    assert all(p.name == n for n, p in PERTURBATIONS.items())


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_severity_zero_is_the_identity_and_a_copy(name):
    x = _input(name)
    out = _apply(name, x, 0)
    assert out is not x
    if name in IMAGE:
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    else:
        assert out == x


@pytest.mark.parametrize("name", list(PERTURBATIONS))
@pytest.mark.parametrize("severity", range(1, MAX_SEVERITY + 1))
def test_output_has_the_input_type_and_leaves_the_input_alone(name, severity):
    x = _input(name)
    before = x.clone() if name in IMAGE else list(x)
    out = _apply(name, x, severity)
    if name in IMAGE:
        assert out.dtype == torch.uint8 and out.shape == x.shape
        assert torch.equal(x, before)
    else:
        assert isinstance(out, list) and len(out) == len(x)
        assert all(isinstance(q, str) and q.strip() for q in out)
        assert x == before


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_deterministic_for_a_seed(name):
    x = _input(name)
    first, again, other = _apply(name, x, 3, seed=5), _apply(name, x, 3, seed=5), _apply(name, x, 3, seed=6)
    same = torch.equal if name in IMAGE else (lambda a, b: a == b)
    assert same(first, again)
    assert same(first, other) == (name not in RANDOM), "the seed should matter exactly for the random ones"


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_damage_grows_with_severity(name):
    damage = [_damage(name, s) for s in SEVERITIES]
    assert damage[0] == 0.0
    assert damage[1] > 0.0, damage
    assert all(b >= a for a, b in itertools.pairwise(damage)), damage
    assert damage[MAX_SEVERITY] > 1.5 * damage[1], damage


def test_occlusion_is_one_grey_square_of_the_stated_area():
    x = torch.zeros(6, 3, 40, 40, dtype=torch.uint8)
    areas = []
    for severity in range(1, MAX_SEVERITY + 1):
        grey = (_apply("occlusion", x, severity) == 128).all(dim=1)  # (M, S, S)
        for mask in grey:
            rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert int(mask.sum()) == int(box), "the covered pixels are not one filled rectangle"
            assert rows.max() - rows.min() == cols.max() - cols.min(), "not a square"
        areas.append(float(grey.float().mean()))
    assert areas == sorted(areas)
    assert areas[0] == pytest.approx(0.05, abs=0.02) and areas[-1] == pytest.approx(0.45, abs=0.03)


def test_rotation_turns_about_the_centre_with_white_corners():
    x = torch.zeros(2, 3, 33, 33, dtype=torch.uint8)
    out = _apply("rotation", x, MAX_SEVERITY)
    assert (out[:, :, 0, 0] >= 250).all() and (out[:, :, -1, -1] >= 250).all()
    assert (out[:, :, 16, 16] == 0).all()


def test_blur_keeps_flat_images_and_smooths_edges():
    flat = torch.full((1, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(_apply("blur", flat, MAX_SEVERITY), flat)
    x = _images()
    # gradient energy: a blurred step keeps its height but spreads it over more pixels
    energy = [float(_apply("blur", x, s).float().diff(dim=-1).pow(2).mean()) for s in SEVERITIES]
    assert energy == sorted(energy, reverse=True) and energy[-1] < 0.3 * energy[0], energy


def test_contrast_shrinks_the_spread_around_the_mean():
    x = _images()
    spread = [float(_apply("contrast", x, s).float().flatten(1).std(dim=1).mean()) for s in SEVERITIES]
    assert spread == sorted(spread, reverse=True) and spread[-1] < 0.15 * spread[0], spread


def test_text_perturbations_keep_their_own_kind_of_change():
    letters = re.compile(r"[^\W\d_]")
    for severity in range(1, MAX_SEVERITY + 1):
        for q, t in zip(QUESTIONS, _apply("typos", QUESTIONS, severity), strict=True):
            assert letters.sub("", q) == letters.sub("", t), "typos changed something other than letters"
        for q, d in zip(QUESTIONS, _apply("word_drop", QUESTIONS, severity), strict=True):
            words, kept = q.split(), iter(q.split())
            assert all(w in kept for w in d.split()) and len(d.split()) <= len(words)  # a subsequence
        for q, s in zip(QUESTIONS, _apply("word_swap", QUESTIONS, severity), strict=True):
            words, moved = q.split(), s.split()
            assert sorted(words) == sorted(moved)
            assert all(w in words[max(0, i - 1):i + 2] for i, w in enumerate(moved)), "moved > 1 place"


@pytest.mark.parametrize("name", TEXT)
def test_text_perturbations_never_empty_a_question(name):
    odd = ["why?", "a b", "??", "x", "ab", "  spaced   out  ", "日本語 の 質問", "e\u0301t\u00e9"]
    for seed in range(20):
        out = _apply(name, odd, MAX_SEVERITY, seed=seed)
        assert all(q.strip() for q in out), out
    assert _apply(name, [""], MAX_SEVERITY) == [""]


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_bad_arguments_are_refused(name):
    x = _input(name)
    for severity in (-1, MAX_SEVERITY + 1, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            _apply(name, x, severity)
    bad = torch.zeros(2, 3, 8, 8) if name in IMAGE else "what color is it?"
    with pytest.raises(ValueError, match=r"uint8 \(M, 3, S, S\)|sequence of strings"):
        _apply(name, bad, 1)


def test_area_under_curve_and_relative_robustness():
    assert area_under_curve([1.0] * 6) == 5.0 and relative_robustness([1.0] * 6) == 1.0
    assert area_under_curve([0.8, 0.4, 0, 0, 0, 0]) == pytest.approx(0.8)
    assert relative_robustness([0.8, 0.4, 0, 0, 0, 0]) == pytest.approx(0.8 / 4.0)
    assert relative_robustness([0.0] * 6) is None


# --------------------------------------------------------------------------------------------------
# evaluation and the report on a tiny trained model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for two epochs (the run directory), and its dataset."""
    root = tmp_path_factory.mktemp("robust")
    tiny = make_tiny_dataset(root / "data", n_images=24, size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(data=str(tiny), out=str(root / "run_a"), epochs=EPOCHS, images_per_batch=4,
                          progress=False, warmup_steps=2, eval_every=0,
                          model={**TINY_MODEL, "image_size": 32})
        Trainer(cfg).fit()
    finally:
        torch.set_num_threads(threads)
    return root / "run_a", tiny


def test_perturb_split_changes_one_modality(trained):
    _, tiny = trained
    split = load_split(tiny, "test", image_size=32)
    noisy = perturb_split(split, "gaussian_noise", 3, seed=0)
    assert not torch.equal(noisy.images, split.images) and noisy.questions == split.questions
    dropped = perturb_split(split, "word_drop", 5, seed=0)
    assert torch.equal(dropped.images, split.images) and dropped.questions != split.questions
    assert dropped.answers == split.answers and torch.equal(dropped.image_index, split.image_index)


def test_run_robustness_writes_every_table_and_matches_evaluate(trained, tmp_path):
    run, tiny = trained
    twin = tmp_path / "run_b"
    shutil.copytree(run, twin)  # same fusion: the two are named after their directories
    out = tmp_path / "report"
    md = run_robustness([str(run), str(twin)], data=str(tiny), split="test", out_dir=out, limit=None, seed=0)
    assert md == out / "robustness.md"

    model = VQAModel.from_pretrained(run)
    split = load_split(tiny, "test", image_size=model.config.image_size)
    clean = evaluate(model, split).accuracy
    report = json.loads((out / "robustness.json").read_text())
    assert [m["name"] for m in report["models"]] == ["run_a", "run_b"]
    assert report["num_questions"] == len(split) and report["severities"] == list(SEVERITIES)
    for m in report["models"]:
        assert m["clean_accuracy"] == clean
        assert set(m["results"]) == set(PERTURBATIONS)
        for name, r in m["results"].items():
            assert r["modality"] == PERTURBATIONS[name].modality
            assert len(r["accuracy"]) == MAX_SEVERITY + 1 and r["accuracy"][0] == clean
            assert r["auc"] == pytest.approx(sum((a + b) / 2 for a, b in itertools.pairwise(r["accuracy"])))
            expected = r["auc"] / (5 * clean) if clean else None
            assert r["relative_robustness"] == pytest.approx(expected)
    a, b = report["models"]
    assert min(r["accuracy"][-1] for r in a["results"].values()) < clean, "no perturbation reached the model"
    assert a["results"] == b["results"], "identical checkpoints scored differently"
    for name in ("occlusion", "typos"):  # the report's numbers are those of evaluate_perturbed
        assert a["results"][name]["accuracy"] == [evaluate_perturbed(model, split, name, s, seed=0)
                                                  for s in SEVERITIES]

    with open(out / "robustness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(PERTURBATIONS)
    assert {(r["model"], r["perturbation"]) for r in rows} == {(m, p) for m in ("run_a", "run_b")
                                                                  for p in PERTURBATIONS}
    assert all(float(r["severity_0"]) == clean for r in rows)

    text = md.read_text()
    assert "| perturbation | modality | 0 | 1 | 2 | 3 | 4 | 5 | AUC | relative robustness |" in text
    assert all(f"| {p} | {PERTURBATIONS[p].modality} |" in text for p in PERTURBATIONS)
    with Image.open(out / "robustness.png") as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_limit_and_the_command_line(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "cli"
    argv = ["robustness", "--checkpoint", str(run), "--out", str(out), "--limit", "2", "--seed", "3"]
    assert main(argv) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert report["num_images"] == 2 and report["num_questions"] == 6 and report["seed"] == 3
    assert [m["name"] for m in report["models"]] == [VQAModel.from_pretrained(run).config.fusion]
    assert "## Summary" in capsys.readouterr().out
