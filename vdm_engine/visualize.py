"""Pictures of explanations and evaluation results.

The pictures a person reads are composed with Pillow (fast enough to draw per request in
``vdm-serve``); colours come from matplotlib's perceptually uniform ``viridis`` colormap and text
from Pillow's bundled FreeType font. The evaluation curves are matplotlib figures.

- ``overlay``: three panels side by side, (a) the image as it is with the kept patches outlined,
  (b) the keep probability as a heat map with a colour bar, (c) the image with the dropped
  patches replaced by grey (what the model still sees); a caption under them.
- ``depth_strip`` / ``depth_grid``: the cumulative keep probability at each of the L+2 depths, one
  small panel each, one row per image.
- ``example_grid``: ``vdm-eval``'s examples, the image untouched then each method's scores.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

__all__ = ["PANEL_MAX_SIDE", "MAX_WIDTH", "overlay", "overlay_scale", "heat_colors", "depth_strip", "depth_grid",
           "example_grid", "plot_curves"]

_MIN_SIDE = 256  # small images are upscaled (nearest, integer factor) to at least this size
PANEL_MAX_SIDE = 640  # ... and no panel is longer than this (large images are reduced)
MAX_WIDTH = 2048  # no picture is wider
_PAD = 8
_GAP = 12
_FONT = 14
_TITLE = 13
_KEPT = (255, 214, 0)  # kept-patch outline: yellow on a black edge, visible on any image
_TRUTH = (255, 40, 40)  # ground-truth targets (toy data): red
_ON_HEAT = (0, 0, 0)  # kept patches on a heat map (yellow there by definition): black
_GREY = (128, 128, 128)
_BAR_W = 14


@functools.lru_cache(maxsize=1)
def _viridis() -> np.ndarray:
    """(256, 3) float RGB in [0, 255]: matplotlib's viridis."""
    try:
        from matplotlib import colormaps
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise ImportError("the pictures need matplotlib's colormaps: pip install matplotlib") from e
    return colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to viridis RGB floats in [0, 255], shape (..., 3); NaN -> 0."""
    v = np.nan_to_num(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0))
    return _viridis()[np.rint(v * 255).astype(np.int64)]


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def overlay_scale(height: int, width: int, *, max_side: int = PANEL_MAX_SIDE) -> float:
    """Scale factor one panel of an image of this size is drawn at.

    An integer >= 1 (nearest upscaling, so patches stay square) that brings the short side to at
    least 256 px without the long side passing ``max_side``; below 1 (``max_side / longest side``)
    for images longer than ``max_side``, which are reduced.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    longest = max(1, height, width)
    if longest > max_side:
        return max_side / longest
    up = max(1, math.ceil(_MIN_SIDE / max(1, min(height, width))))
    return min(up, max(1, max_side // longest))


def _scaled(img: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the panel's pixels: nearest integer upscaling, or a box-filter reduction."""
    from PIL import Image

    H, W = img.shape[:2]
    s = overlay_scale(H, W, max_side=max_side)
    if s >= 1:
        return img.repeat(int(s), 0).repeat(int(s), 1)
    size = (max(1, round(W * s)), max(1, round(H * s)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, resample=Image.Resampling.BOX,
                                                                        reducing_gap=2.0))


def _cells(h: int, w: int, OH: int, OW: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Patch row/column of every output pixel row/column, and the patch borders in pixels."""
    rows = np.minimum((np.arange(OH) * h) // OH, h - 1)
    cols = np.minimum((np.arange(OW) * w) // OW, w - 1)
    ys = [int(round(i * OH / h)) for i in range(h + 1)]
    xs = [int(round(j * OW / w)) for j in range(w + 1)]
    return rows, cols, ys, xs


def _outline(panel, cells: np.ndarray, color, *, lw: int | None = None, edge: bool = True) -> None:
    """Draw the border of the ``cells`` (h, w) bool regions on a PIL image in place, on the cells' edges."""
    from PIL import ImageDraw

    h, w = cells.shape
    OW, OH = panel.size
    _, _, ys, xs = _cells(h, w, OH, OW)
    lw = lw or max(2, min(OH // h, OW // w) // 12)
    draw = ImageDraw.Draw(panel)
    segments = []
    for i in range(h):
        for j in range(w):
            if not cells[i, j]:
                continue
            x0, x1, y0, y1 = xs[j], xs[j + 1] - 1, ys[i], ys[i + 1] - 1
            if x1 < x0 or y1 < y0:  # a patch thinner than a pixel at this size
                continue
            if i == 0 or not cells[i - 1, j]:
                segments.append(((x0, y0), (x1, y0 + lw - 1)))
            if i == h - 1 or not cells[i + 1, j]:
                segments.append(((x0, y1 - lw + 1), (x1, y1)))
            if j == 0 or not cells[i, j - 1]:
                segments.append(((x0, y0), (x0 + lw - 1, y1)))
            if j == w - 1 or not cells[i, j + 1]:
                segments.append(((x1 - lw + 1, y0), (x1, y1)))
    for (a, b) in segments:  # a band lw wide inside the region's edge (clipped to thin cells)
        draw.rectangle([(max(a[0], 0), max(a[1], 0)), (max(b[0], a[0]), max(b[1], a[1]))], fill=color)
    if edge and lw >= 3:  # a dark line through the band's middle keeps it visible on bright images
        for (a, b) in segments:
            cx0, cy0, cx1, cy1 = a[0], a[1], b[0], b[1]
            if cx1 - cx0 > cy1 - cy0:
                y = (cy0 + cy1) // 2
                draw.line([(cx0, y), (cx1, y)], fill=(0, 0, 0), width=1)
            else:
                x = (cx0 + cx1) // 2
                draw.line([(x, cy0), (x, cy1)], fill=(0, 0, 0), width=1)


def _heat_panel(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) values in [0, 1] -> (OH, OW, 3) uint8 viridis blocks, one per patch."""
    OW, OH = size
    h, w = grid.shape
    rows, cols, _, _ = _cells(h, w, OH, OW)
    return np.rint(heat_colors(np.asarray(grid, dtype=np.float64)[rows][:, cols])).astype(np.uint8)


def _colour_bar(height: int, *, threshold: float | None = None, labels: bool = True):
    """A vertical viridis bar, 1 at the top, with 0 / 0.5 / 1 ticks (and the threshold marked)."""
    from PIL import Image, ImageDraw

    height = max(height, 40)
    font = _font(11)
    label_w = 30 if labels else 0
    bar = Image.new("RGB", (_BAR_W + label_w + 4, height), (255, 255, 255))
    v = np.linspace(1.0, 0.0, height)[:, None].repeat(_BAR_W, 1)
    bar.paste(Image.fromarray(np.rint(heat_colors(v)).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(bar)
    if labels:
        for t in (0.0, 0.5, 1.0):
            y = int(round((1 - t) * (height - 1)))
            draw.line([(_BAR_W, y), (_BAR_W + 3, y)], fill=(0, 0, 0))
            draw.text((_BAR_W + 5, min(max(y - 6, 0), height - 13)), f"{t:g}", fill=(0, 0, 0), font=font)
    if threshold is not None:
        y = int(round((1 - threshold) * (height - 1)))
        draw.line([(0, y), (_BAR_W - 1, y)], fill=(255, 255, 255), width=1)
    return bar


def _fit(text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def overlay(image: np.ndarray, grid_mask: np.ndarray, *, threshold: float = 0.5, caption: Sequence[str] = (),
            max_side: int = PANEL_MAX_SIDE):
    """The three-panel picture of one explanation, at a readable, bounded size.

    Each panel is the image scaled by s = ``overlay_scale(H, W, max_side=max_side)`` (integer
    nearest upscaling for small inputs, a box-filter reduction for large ones): (a) the image as it
    is, kept patches (mask > ``threshold``) outlined and nothing else drawn on it; (b) the keep
    probability per patch in viridis, with a colour bar (0..1, the threshold marked); (c) the image
    with the dropped patches replaced by grey. Panel titles above, ``caption`` lines below.

    Args:
        image: (H, W, 3) uint8 RGB.
        grid_mask: (h, w) keep probabilities in [0, 1] on the patch grid (H, W need not be multiples).
        threshold: keep probability above which a patch is kept.
        caption: text lines (cut with an ellipsis where too long).
        max_side: longest side of one panel (default 640).

    Returns:
        PIL.Image RGB, between 256 and ``MAX_WIDTH`` pixels wide; ``.info["panels"]`` holds the
        (left, top, right, bottom) box of "image", "heat", "grey" and "caption".
    """
    from PIL import Image, ImageDraw

    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    m = np.asarray(grid_mask, dtype=np.float64)
    if m.ndim != 2 or min(m.shape) < 1:
        raise ValueError(f"grid_mask must be (h, w), got shape {m.shape}")
    big = _scaled(img, min(max_side, (MAX_WIDTH - 2 * _PAD - 2 * _GAP - _BAR_W - 40) // 3))
    OH, OW = big.shape[:2]
    kept = m > threshold
    rows, cols, _, _ = _cells(*m.shape, OH, OW)

    a = Image.fromarray(np.ascontiguousarray(big))
    _outline(a, kept, _KEPT)
    b = Image.fromarray(_heat_panel(m, (OW, OH)))
    c = big.copy()
    c[~kept[rows][:, cols]] = _GREY
    c = Image.fromarray(c)
    bar = _colour_bar(OH, threshold=threshold)

    font, title_font = _font(_FONT), _font(_TITLE)
    title_h = _TITLE + 8
    line_h = _FONT + 5
    width = 2 * _PAD + 3 * OW + 2 * _GAP + bar.size[0]
    width = min(max(width, _MIN_SIDE), MAX_WIDTH)
    height = _PAD + title_h + OH + (_PAD + line_h * len(caption) if caption else 0) + _PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = _PAD
    titles = ("image, kept patches outlined", "keep probability", "what the model still sees")
    boxes = {}
    for k, (panel, title, key) in enumerate(zip((a, b, c), titles, ("image", "heat", "grey"))):
        draw.text((x, _PAD), _fit(title, title_font, max(OW, 40)), fill=(0, 0, 0), font=title_font)
        canvas.paste(panel, (x, _PAD + title_h))
        boxes[key] = (x, _PAD + title_h, x + OW, _PAD + title_h + OH)
        x += OW
        if k == 1:
            canvas.paste(bar, (x + 2, _PAD + title_h))
            x += bar.size[0]
        x += _GAP
    y = _PAD + title_h + OH + _PAD
    boxes["caption"] = (0, y, width, height)
    for line in caption:
        draw.text((_PAD, y), _fit(str(line), font, width - 2 * _PAD), fill=(0, 0, 0), font=font)
        y += line_h
    canvas.info["panels"] = boxes  # (left, top, right, bottom) of each part, for programs and tests
    return canvas


def _check_depths(layer_masks) -> np.ndarray:
    lm = np.asarray(layer_masks, dtype=np.float64)
    if lm.ndim != 3 or min(lm.shape) < 1:
        raise ValueError(f"layer_masks must be (L+2, h, w), got shape {lm.shape}")
    return lm


def depth_grid(images: Sequence[np.ndarray], layer_masks: Sequence[np.ndarray], *, threshold: float = 0.5,
               labels: Sequence[str] | None = None, panel: int = 96):
    """Where in the network each patch is decided: one row per image, the image then one panel per depth.

    Args:
        images: (H, W, 3) uint8 images.
        layer_masks: per image (L+2, h, w), the cumulative keep probability up to each hidden state
            (``Explanation.layer_masks`` on the grid); the last depth is the patch mask.
        threshold: the last depth's kept patches are outlined.
        labels: a line of text per row, under it.
        panel: side of a depth panel in pixels (the image panel is as tall).

    Returns:
        PIL.Image RGB at most ``MAX_WIDTH`` wide (panels shrink for deep models).
    """
    from PIL import Image, ImageDraw

    if len(images) != len(layer_masks) or not len(images):
        raise ValueError(f"need one (L+2, h, w) layer mask per image, got {len(images)} images and "
                         f"{len(layer_masks)} masks")
    lms = [_check_depths(lm) for lm in layer_masks]
    D = lms[0].shape[0]
    if any(lm.shape[0] != D for lm in lms):
        raise ValueError("every image needs the same number of depths")
    bar = _colour_bar(panel)
    room = MAX_WIDTH - 2 * _PAD - bar.size[0] - _GAP
    size = max(24, min(panel, room // (D + 1) - 4))
    font, small = _font(_TITLE), _font(11)
    head = _TITLE + 8
    line = (_TITLE + 6) if labels else 0
    row_h = size + line + _PAD
    width = max(_MIN_SIDE, min(MAX_WIDTH, 2 * _PAD + (D + 1) * (size + 4) + _GAP + bar.size[0]))
    canvas = Image.new("RGB", (width, _PAD + head + 12 + row_h * len(images)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), _fit("cumulative keep probability by depth (0 = patch embeddings; the last is the "
                                 "patch mask, kept patches outlined)", font, width - 2 * _PAD),
              fill=(0, 0, 0), font=font)
    y0 = _PAD + head
    for d in range(D):
        draw.text((_PAD + (d + 1) * (size + 4), y0), str(d), fill=(0, 0, 0), font=small)
    y = y0 + 12
    for r, (img, lm) in enumerate(zip(images, lms)):
        pic = np.asarray(img)
        if pic.dtype != np.uint8 or pic.ndim != 3 or pic.shape[-1] != 3:
            raise ValueError(f"image must be (H, W, 3) uint8, got {pic.shape} {pic.dtype}")
        thumb = Image.fromarray(np.ascontiguousarray(pic))
        thumb = thumb.resize((size, size), Image.Resampling.NEAREST if max(pic.shape[:2]) <= size
                             else Image.Resampling.BOX)
        canvas.paste(thumb, (_PAD, y))
        for d in range(D):
            p = Image.fromarray(_heat_panel(lm[d], (size, size)))
            if d == D - 1:
                _outline(p, lm[d] > threshold, _ON_HEAT, lw=max(2, size // 40), edge=False)
            canvas.paste(p, (_PAD + (d + 1) * (size + 4), y))
        if labels:
            draw.text((_PAD, y + size + 2), _fit(str(labels[r]), small, width - 2 * _PAD), fill=(0, 0, 0), font=small)
        y += row_h
    canvas.paste(bar, (_PAD + (D + 1) * (size + 4) + _GAP // 2, y0 + 12))
    return canvas


def depth_strip(image: np.ndarray, layer_masks: np.ndarray, *, threshold: float = 0.5, label: str | None = None,
                panel: int = 96):
    """``depth_grid`` of one image: the mask emerging over the L+2 depths of one forward pass."""
    return depth_grid([image], [layer_masks], threshold=threshold, labels=None if label is None else [label],
                      panel=panel)


def example_grid(images: Sequence[np.ndarray], scores: dict, *, kept: np.ndarray | None = None,
                 truth: np.ndarray | None = None, labels: Sequence[str] | None = None, panel: int = 128):
    """``vdm-eval``'s example grid: per row the image untouched, then each method's scores.

    Scores are shown on one viridis scale per row: each method's scores min-max normalised per
    image, DiffMask's keep probability as it is (already in [0, 1]). ``kept`` (DiffMask's kept
    patches) is outlined in black on the ``diffmask`` column, ``truth`` (ground-truth targets, toy
    data) in red on every method's column.

    Args:
        images: n (H, W, 3) uint8 images.
        scores: method name -> (n, h, w) scores.
        kept, truth: optional (n, h, w) bool.
        labels: a label per row (the predicted class).
        panel: side of each panel in pixels.
    """
    from PIL import Image, ImageDraw

    names = list(scores)
    n = len(images)
    if not n or not names:
        raise ValueError("example_grid needs at least one image and one method")
    cols = len(names) + 1
    size = max(32, min(panel, (MAX_WIDTH - 2 * _PAD - _BAR_W - 40) // cols - 4))
    font, small = _font(_TITLE), _font(11)
    head = _TITLE + 10
    line = (_TITLE + 6) if labels else 0
    row_h = size + line + _PAD
    width = max(_MIN_SIDE, 2 * _PAD + cols * (size + 4) + _BAR_W + 40)
    canvas = Image.new("RGB", (width, _PAD + head + row_h * n), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(["image", *names]):
        draw.text((_PAD + j * (size + 4), _PAD), _fit(title, font, size), fill=(0, 0, 0), font=font)
    y = _PAD + head
    for i, img in enumerate(images):
        pic = np.asarray(img)
        thumb = Image.fromarray(np.ascontiguousarray(pic)).resize(
            (size, size), Image.Resampling.NEAREST if max(pic.shape[:2]) <= size else Image.Resampling.BOX)
        canvas.paste(thumb, (_PAD, y))
        for j, name in enumerate(names):
            s = np.asarray(scores[name][i], dtype=np.float64)
            if name != "diffmask":
                lo, hi = np.nanmin(s), np.nanmax(s)
                s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
            p = Image.fromarray(_heat_panel(s, (size, size)))
            if truth is not None:
                _outline(p, np.asarray(truth[i], dtype=bool), _TRUTH, lw=max(2, size // 40), edge=False)
            if name == "diffmask" and kept is not None:
                _outline(p, np.asarray(kept[i], dtype=bool), _ON_HEAT, lw=max(2, size // 64), edge=False)
            canvas.paste(p, (_PAD + (j + 1) * (size + 4), y))
        if labels:
            draw.text((_PAD, y + size + 2), _fit(str(labels[i]), small, width - 2 * _PAD), fill=(0, 0, 0), font=small)
        y += row_h
    canvas.paste(_colour_bar(size), (_PAD + cols * (size + 4), _PAD + head))
    return canvas


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("plots need the optional package matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(results: dict, replacement: str | None) -> list:
    """(x %, title, {method: (curve, auc)}) for every curve family present in ``results``."""
    methods = results["methods"]
    out = []
    if replacement is None:  # ROAD: imputation, not a replacement setting
        x = np.asarray(results.get("road_fractions", [])) * 100
        for order, label in (("positive", "ROAD most relevant first: P(class)  (lower better)"),
                             ("negative", "ROAD least relevant first: P(class)  (higher better)")):
            out.append((x, label, {m: (e["road"][order]["prob"], e["road"][order]["auc"])
                                   for m, e in methods.items() if "road" in e}))
        return out
    x = np.asarray(results.get("fractions", [])) * 100
    for order, key, label in [("positive", "prob", "positive: P(original class)  (lower better)"),
                              ("negative", "prob", "negative: P(original class)  (higher better)"),
                              ("positive", "kl", "positive: KL(orig || perturbed)  (higher better)"),
                              ("negative", "kl", "negative: KL(orig || perturbed)  (lower better)")]:
        curves = {m: (e[replacement][order][key], e[replacement][order]["auc_" + key])
                  for m, e in methods.items() if replacement in e}
        if curves:
            out.append((x, label, curves))
    for game, label in (("deletion", "deletion, one patch a step: P(class)  (lower better)"),
                        ("insertion", "insertion, one patch a step: P(class)  (higher better)")):
        curves = {m: (e["insertion_deletion"][replacement][game]["prob"], e["insertion_deletion"][replacement][game]["auc"])
                  for m, e in methods.items() if replacement in e.get("insertion_deletion", {})}
        if curves:
            n = len(next(iter(curves.values()))[0]) - 1
            out.append((np.arange(n + 1) / n * 100, label, curves))
    return out


def plot_curves(results: dict, path, *, replacement: str | None = "noise", title: str = "") -> None:
    """Plot the curves of every method to a PNG: perturbation (probability and KL, positive and
    negative) and insertion/deletion for one replacement, or ROAD's two orders (``replacement=None``).

    Args:
        results: the dict returned by ``vdm_engine.evaluation.evaluate`` (or read from results.json).
        path: output PNG path (written atomically).
        replacement: which replacement setting to plot; None for the ROAD curves.

    Raises:
        ValueError: ``results`` holds no curves for that setting.
    """
    from ._io import atomic_path

    panels = _panels(results, replacement)
    if not panels:
        raise ValueError(f"no curves to plot for replacement {replacement!r}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    for ax, (x, label, curves) in zip(axes[0], panels):
        for name, (curve, area) in curves.items():
            ax.plot(x, curve, marker="o", ms=2 if len(x) > 12 else 3, label=f"{name} ({area:.3g})")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("patches removed (%)" if "insertion" not in label else "patches inserted (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method (AUC)", title_fontsize=7)
    fig.suptitle(title or (f"curves, {replacement} replacement" if replacement else "ROAD curves"))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
