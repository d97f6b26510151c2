"""mmfuse.plotting: the attention figure's shared scale and near-uniform detection, and that figures are written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmfuse.plotting import (
    AttentionMaps,
    attention_figure,
    confusion_figure,
    curves_figure,
    figure_png,
    near_uniform,
    peak_ratio,
    save_figure,
    shared_scale,
)


def _maps(maps: torch.Tensor, num_keys: int = 0) -> AttentionMaps:
    return AttentionMaps([f"w{i}" for i in range(maps.shape[0])], maps, "what shape is it?", "circle", 0.9,
                         num_keys=num_keys)


def _spot(h: int = 4, w: int = 4) -> torch.Tensor:
    m = torch.full((h, w), 0.2 / (h * w - 1))
    m[1, 2] = 0.8
    return m


def test_peak_ratio_and_near_uniform() -> None:
    flat = torch.full((4, 4), 1 / 16)
    noisy = flat + 0.002 * torch.randn(4, 4)  # a uniform map with a little noise is still uniform
    half = flat * 0.5  # a row that puts half its weight on text tokens, spread evenly over the image
    maps = torch.stack([flat, noisy, half, _spot(), torch.zeros(4, 4)])
    ratios = peak_ratio(maps)
    torch.testing.assert_close(ratios[[0, 2, 4]], torch.ones(3, dtype=torch.float64))
    assert float(ratios[3]) == pytest.approx(0.8 * 16)
    assert near_uniform(maps).tolist() == [True, True, True, False, True]


def test_shared_scale_is_the_largest_weight_of_any_panel() -> None:
    maps = torch.stack([_spot(), torch.full((4, 4), 1 / 16)])
    assert shared_scale(maps) == (0.0, pytest.approx(0.8))
    # a uniform map alone keeps its own level (1/16), not a stretched 1.0
    assert shared_scale(maps[1:]) == (0.0, pytest.approx(1 / 16))


def test_uniform_level_uses_all_keys() -> None:
    assert _maps(torch.rand(2, 4, 4)).uniform == pytest.approx(1 / 16)
    assert _maps(torch.rand(2, 4, 4), num_keys=20).uniform == pytest.approx(1 / 20)  # 16 image + 4 text keys


def _image_data(fig) -> list:
    """The arrays of each panel's images (first: the picture, then the overlay mask)."""
    return [[im.get_array() for im in ax.get_images()] for ax in fig.axes]


def test_attention_figure_panels_share_one_scale() -> None:
    image = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    weak = _spot() * 0.5 + 1 / 32  # the same shape of map at half the strength
    fig = attention_figure(image, _maps(torch.stack([_spot(), weak, torch.full((4, 4), 1 / 16)])))
    # the image, three panels, the colour bar
    assert len(fig.axes) == 5
    assert fig.axes[0].get_title() == "image" and len(fig.axes[0].get_images()) == 1
    titles = [ax.get_title() for ax in fig.axes[1:4]]
    assert titles[2].endswith("no focus")
    strong_mask, weak_mask = (_image_data(fig)[i][1][..., 3] for i in (1, 2))
    # On a shared scale the weaker map leaves the image darker at its peak; on per-panel scales the two
    # peaks would be equally clear.
    assert float(strong_mask.min()) < 0.25
    assert float(weak_mask.min()) > float(strong_mask.min()) + 0.1
    # the colour bar spans 0..the largest weight and marks the uniform level 1/16
    bar = fig.axes[-1]
    assert bar.get_ylim() == pytest.approx((0.0, 0.8))
    assert any(line.get_ydata()[0] == pytest.approx(1 / 16) for line in bar.get_lines())
    assert any("uniform 1/16" in t.get_text() for t in bar.texts)


def test_attention_figure_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"uint8 \(3, S, S\)"):
        attention_figure(torch.zeros(3, 16, 16), _maps(torch.rand(1, 4, 4)))
    with pytest.raises(ValueError, match="P = 2 labels"):
        attention_figure(torch.zeros(3, 16, 16, dtype=torch.uint8),
                         AttentionMaps(["a", "b"], torch.rand(3, 4, 4), "q", "a", 0.5))


def test_figures_are_written(tmp_path: Path) -> None:
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = save_figure(attention_figure(image, _maps(torch.rand(3, 4, 4).softmax(0))), tmp_path / "a" / "attn.png")
    rows = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5}, {"epoch": 2, "train_loss": 0.5}]
    curves = save_figure(curves_figure(rows), tmp_path / "curves.png")
    confusion = save_figure(confusion_figure(torch.tensor([[3, 1], [0, 4]]), ["yes", "no"]), tmp_path / "c.png")
    for path in (out, curves, confusion):
        with Image.open(path) as im:
            assert im.format == "PNG"
            im.verify()
    png = figure_png(confusion_figure(torch.eye(3), ["a", "b", "c"]))
    assert png.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=r"\(A, A\) = \(2, 2\)"):
        confusion_figure(torch.eye(3), ["a", "b"])
