"""Properties of the pictures (not pixels by hand): the image shown as it is, heat colours in the
scores' order, bounded sizes, rendered captions, depth strips and example grids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vdm_engine.visualize import MAX_WIDTH, depth_grid, depth_strip, example_grid, heat_colors, overlay


def _crop(picture, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.asarray(picture.convert("RGB"))[y0:y1, x0:x1].astype(int)


def _viridis_position(rgb: np.ndarray) -> np.ndarray:
    """Index on the 256-entry colormap nearest to each colour (..., 3)."""
    lut = heat_colors(np.linspace(0, 1, 256))
    return np.argmin(((rgb[..., None, :] - lut) ** 2).sum(-1), axis=-1)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    grid = rng.permutation(16).reshape(4, 4) / 15.0  # distinct scores, 8 of 16 above 0.5
    return img, grid, overlay(img, grid, threshold=0.5, caption=["vit-digits predicts 6 (class 6, p=0.956)", "1.  6  (0.956)"])


def test_image_panel_is_the_image_except_on_the_kept_patches_outline(picture):
    img, grid, out = picture
    panel = _crop(out, out.info["panels"]["image"])
    s = panel.shape[0] // 40
    src = img.repeat(s, 0).repeat(s, 1).astype(int)
    changed = (panel != src).any(-1)
    assert changed.any(), "no outline drawn"
    # every changed pixel is within a band along the edge of a kept patch (cells of 10s x 12s pixels)
    ch, cw = 10 * s, 12 * s
    band = max(2, min(ch, cw) // 12)
    ys, xs = np.nonzero(changed)
    kept = grid > 0.5
    assert kept[ys // ch, xs // cw].all(), "a dropped patch was drawn on"
    near_edge = np.minimum.reduce([ys % ch, ch - 1 - ys % ch, xs % cw, cw - 1 - xs % cw]) < band
    assert near_edge.all(), "pixels inside a patch were changed"


def test_heat_panel_colours_follow_the_scores(picture):
    img, grid, out = picture
    panel = _crop(out, out.info["panels"]["heat"])
    ch, cw = panel.shape[0] // 4, panel.shape[1] // 4
    centres = np.array([[panel[i * ch + ch // 2, j * cw + cw // 2] for j in range(4)] for i in range(4)])
    pos = _viridis_position(centres.astype(float))
    order = np.argsort(grid.ravel())
    assert (np.diff(pos.ravel()[order]) > 0).all(), "heat colours are not in the scores' order"
    assert pos.ravel()[order[0]] < 5 and pos.ravel()[order[-1]] > 250


def test_grey_panel_keeps_the_kept_patches_only(picture):
    img, grid, out = picture
    panel = _crop(out, out.info["panels"]["grey"])
    s = panel.shape[0] // 40
    src = img.repeat(s, 0).repeat(s, 1).astype(int)
    kept = np.kron(grid > 0.5, np.ones((10 * s, 12 * s))).astype(bool)
    assert (panel[kept] == src[kept]).all() and (panel[~kept] == 128).all()


def test_caption_is_rendered(picture):
    _, _, out = picture
    caption = _crop(out, out.info["panels"]["caption"])
    assert (caption < 128).any(-1).sum() > 200, "no text in the caption area"


@pytest.mark.parametrize("side", [1, 8000])
def test_tiny_and_huge_inputs_give_a_readable_width(side):
    img = np.full((side, side, 3), 200, np.uint8)
    out = overlay(img, np.eye(4), caption=["x"])
    assert 256 <= out.size[0] <= 2048
    x0, y0, x1, y1 = out.info["panels"]["image"]
    assert x1 - x0 >= 256 and y1 - y0 >= 256  # upscaled (1x1) or reduced (8000x8000), never a dot


def test_depth_strip_one_panel_per_depth_and_bounded():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    lm = np.cumprod(rng.uniform(0.5, 1, (14, 4, 4)), axis=0)  # a 12-layer model: L+2 = 14 depths
    strip = depth_strip(img, lm, label="6 (p=0.9)")
    assert 256 <= strip.size[0] <= MAX_WIDTH
    deep = depth_grid([img] * 2, [np.ones((40, 4, 4))] * 2)  # many depths shrink, never overflow
    assert deep.size[0] <= MAX_WIDTH
    with pytest.raises(ValueError, match="one .* layer mask per image"):
        depth_grid([img], [])
    with pytest.raises(ValueError, match=r"\(L\+2, h, w\)"):
        depth_strip(img, np.ones((4, 4)))


def test_example_grid_first_column_is_the_image_untouched():
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(3)]
    scores = {"diffmask": rng.uniform(0, 1, (3, 4, 4)), "ig": rng.normal(size=(3, 4, 4))}
    truth = rng.uniform(size=(3, 4, 4)) > 0.7
    grid = example_grid(imgs, scores, kept=scores["diffmask"] > 0.5, truth=truth, labels=["a", "b", "c"], panel=64)
    a = np.asarray(grid.convert("RGB"))
    thumb = np.asarray(Image.fromarray(imgs[0]).resize((64, 64), Image.Resampling.NEAREST))
    found = [(y, x) for y in range(a.shape[0] - 63) for x in range(0, 20) if np.array_equal(a[y:y + 64, x:x + 64], thumb)]
    assert found, "the first image is not shown unchanged"
