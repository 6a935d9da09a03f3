import numpy as np
import pytest
from PIL import Image

from star.data.views import ViewPolicy, make_views, tencrop_views, to_rgb


def gradient_image(width: int, height: int) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.arange(height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, (x // 2 + y // 2)], -1).astype(np.uint8))


def test_tencrop_boxes_without_resize_are_torchvision_tencrop():
    # 281 = int(256 * 1.1): the ADM frame is the image itself, so boxes are exact pixel offsets.
    views = tencrop_views(gradient_image(281, 281), 256, 1.1)
    boxes = [tuple(round(c, 6) for c in v.box) for v in views]
    assert boxes == [
        (0, 0, 256, 256), (25, 0, 281, 256), (0, 25, 256, 281), (25, 25, 281, 281), (12, 12, 268, 268),
        (25, 0, 281, 256), (0, 0, 256, 256), (25, 25, 281, 281), (0, 25, 256, 281), (13, 12, 269, 268),
    ]
    assert [v.flip for v in views] == [False] * 5 + [True] * 5
    # A mirrored view shows the mirrored pixels of the unflipped crop with the same source box.
    assert np.array_equal(views[5].pixels, views[1].pixels[:, ::-1])
    assert np.array_equal(views[6].pixels, views[0].pixels[:, ::-1])
    source = np.asarray(gradient_image(281, 281))
    assert np.array_equal(views[9].pixels, source[12:268, 13:269][:, ::-1])


def test_tencrop_boxes_map_back_through_adm_halving():
    # 562x600 (w x h): one BOX halving to 281x300, no bicubic change; ADM centre crop top = 9 -> 18 source px.
    views = tencrop_views(gradient_image(562, 600), 256, 1.1)
    assert views[0].box == pytest.approx((0, 18, 512, 530))
    assert views[3].box == pytest.approx((50, 68, 562, 580))
    assert views[4].box == pytest.approx((24, 42, 536, 554))


def test_small_images_are_upscaled_to_the_frame():
    views = tencrop_views(gradient_image(20, 30), 32, 1.1)
    assert all(v.pixels.shape == (32, 32, 3) for v in views)
    # The frame covers the full width of a portrait source.
    assert views[0].box[0] == pytest.approx(0) and views[1].box[2] == pytest.approx(20)


def test_random_views_are_seeded_per_image():
    image = gradient_image(120, 90)
    first = make_views(image, ViewPolicy.parse("random:3"), 32, 1.1, key="a/b", seed=7)
    again = make_views(image, ViewPolicy.parse("random:3"), 32, 1.1, key="a/b", seed=7)
    other = make_views(image, ViewPolicy.parse("random:3"), 32, 1.1, key="a/c", seed=7)
    assert [v.box for v in first] == [v.box for v in again]
    assert [v.box for v in first] != [v.box for v in other]
    for view in first:
        x0, y0, x1, y1 = view.box
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 90


def test_view_policy_parsing():
    assert ViewPolicy.parse("tencrop").num_views == 10
    assert ViewPolicy.parse("center").num_views == 1
    assert ViewPolicy.parse("random:4").num_views == 4
    for bad in ("random:0", "random:x", "five"):
        with pytest.raises(ValueError, match="view policy"):
            ViewPolicy.parse(bad)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    base = gradient_image(16, 16)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base)[..., 0].astype(np.uint16) * 257)
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    if mode == "I;16":  # 16-bit values are scaled to 8 bits, not clipped
        assert np.array_equal(np.asarray(rgb)[..., 0], np.asarray(base)[..., 0])


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255


def test_view_policy_names_are_exact_and_random_n_is_bounded():
    assert ViewPolicy.parse("tencrop").num_views == 10 and ViewPolicy.parse("center").num_views == 1
    assert ViewPolicy.parse("random:1").num_views == 1 and ViewPolicy.parse("random:64").num_views == 64
    assert str(ViewPolicy.parse("random:7")) == "random:7"
    for spec in ("TenCrop", " tencrop", "CENTER", "Random:4"):
        with pytest.raises(ValueError, match="choose one of tencrop, center, random:N"):
            ViewPolicy.parse(spec)
    for spec in ("random:0", "random:65", "random:-1", "random:1e3", "random:²"):
        with pytest.raises(ValueError, match="integer from 1 to 64"):
            ViewPolicy.parse(spec)
