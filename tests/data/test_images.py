from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmfuse.data import DataError, load_image, load_images


def _rgb(t: torch.Tensor) -> tuple[int, ...]:
    """The colour of a uniform (3, S, S) image."""
    assert (t == t[:, :1, :1]).all(), "image is not uniform"
    return tuple(int(c) for c in t[:, 0, 0])


@pytest.mark.parametrize(
    ("mode", "color", "suffix", "save_kwargs", "expected"),
    [
        ("RGB", (10, 20, 30), "png", {}, (10, 20, 30)),
        ("RGBA", (10, 20, 30, 255), "png", {}, (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), "png", {}, (255, 255, 255)),  # transparent reads as white
        ("RGBA", (0, 0, 0, 128), "png", {}, (127, 127, 127)),  # half black over white
        ("LA", (40, 0), "png", {}, (255, 255, 255)),
        ("L", 100, "png", {}, (100, 100, 100)),
        ("1", 1, "png", {}, (255, 255, 255)),
        ("P", (10, 200, 30), "png", {}, (10, 200, 30)),
        ("P", (10, 200, 30), "png", {"transparency": 1}, (255, 255, 255)),
        ("I;16", 65535, "png", {}, (255, 255, 255)),  # 16-bit scaled to 8-bit
        ("I;16", 257 * 100, "png", {}, (100, 100, 100)),
        ("I", 257 * 7, "tiff", {}, (7, 7, 7)),  # 32-bit integer images are read as 16-bit
        ("CMYK", (0, 0, 0, 0), "tiff", {}, (255, 255, 255)),
        ("CMYK", (255, 0, 0, 0), "tiff", {}, (0, 255, 255)),
    ],
)
def test_every_mode_becomes_rgb_uint8(tmp_path, write_image, mode, color, suffix, save_kwargs, expected):
    path = write_image(tmp_path / f"x.{suffix}", mode, (8, 8), color, **save_kwargs)
    out = load_image(path, 8)
    assert out.dtype == torch.uint8 and out.shape == (3, 8, 8)
    assert _rgb(out) == pytest.approx(expected, abs=1)


def test_resize_stretches_without_cropping(tmp_path):
    # A wide image whose leftmost tenth is red: a centre crop would lose the red, a stretch keeps it.
    im = Image.new("RGB", (200, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    im.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 32)
    assert out.shape == (3, 32, 32)
    assert out[:, :, 0].tolist() == [[255] * 32, [0] * 32, [0] * 32]  # red across the whole height
    assert out[:, :, -1].tolist() == [[0] * 32, [0] * 32, [255] * 32]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "photo.jpg", 16).int()
    assert out[0, 2, 8] > 200 and out[2, 2, 8] < 50  # top is red
    assert out[2, 13, 8] > 200 and out[0, 13, 8] < 50  # bottom is blue


def _truncated_png(path):
    Image.effect_noise((64, 64), 50).save(path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "cannot decode"),
        (lambda p: p.write_bytes(b"definitely not a png" * 10), "cannot decode"),
        (_truncated_png, "cannot decode"),
    ],
    ids=["missing", "empty", "garbage", "truncated"],
)
def test_unreadable_file_raises_data_error_naming_it(tmp_path, make, reason):
    path = tmp_path / "broken.png"
    make(path)
    with pytest.raises(DataError, match=reason) as info:
        load_image(path, 8)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)


def test_load_images_stacks_in_order(tmp_path, write_image):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    paths = [write_image(tmp_path / f"{i}.png", "RGB", (5 + i, 9), c) for i, c in enumerate(colors)]
    out = load_images(paths, 4, progress=False)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 4, 4)
    assert [_rgb(img) for img in out] == colors
    assert load_images([], 4).shape == (0, 3, 4, 4)


def test_bad_size_rejected(tmp_path, write_image):
    path = write_image(tmp_path / "x.png")
    for size in (0, -3, 2049, 1.5):
        with pytest.raises(ValueError, match=r"image_size must be an int in \[1, 2048\]"):
            load_image(path, size)
