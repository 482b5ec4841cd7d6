"""Pictures of explanations and evaluation results.

``overlay`` draws a patch mask over an image with PIL only (no matplotlib at runtime). The curve
plots use matplotlib (optional dependency, Agg backend) and are imported lazily.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["MAX_SIDE", "overlay", "overlay_scale", "caption_height", "heat_colors", "plot_curves", "plot_overlay_grid"]

_MIN_SIDE = 256  # small images are upscaled (nearest, integer factor) to at least this size
MAX_SIDE = 1024  # ... and no overlay is larger than this on its longest side (large images are reduced)
_LINE_HEIGHT = 14
_PAD = 6
_OUTLINE = (0, 255, 255)  # cyan: the kept-patch outline
# A yellow -> red -> dark ramp (low mask values barely tint: the overlay's alpha follows the mask).
_RAMP = np.array([[40, 0, 60], [200, 30, 30], [255, 140, 0], [255, 240, 60]], dtype=np.float64)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB float colours (..., 3) on a dark -> red -> yellow ramp."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    t = (v - lo)[..., None]
    return _RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t


def overlay_scale(height: int, width: int, *, max_side: int = MAX_SIDE) -> float:
    """Scale factor ``overlay`` draws an image of this size at.

    An integer >= 1 (nearest upscaling) that brings the short side to at least 256 px without
    the long side passing ``max_side``; below 1 (``max_side / longest side``) for images longer
    than ``max_side``, which are reduced.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    longest = max(1, height, width)
    if longest > max_side:
        return max_side / longest
    up = max(1, math.ceil(_MIN_SIDE / max(1, min(height, width))))
    return min(up, max(1, max_side // longest))


def caption_height(num_lines: int) -> int:
    """Pixel height of the caption strip below the image for ``num_lines`` lines."""
    return 0 if num_lines == 0 else 2 * _PAD + _LINE_HEIGHT * num_lines


def overlay(image: np.ndarray, grid_mask: np.ndarray, *, threshold: float = 0.5, caption: Sequence[str] = (),
            alpha: float = 0.45, dim: float = 0.4, max_side: int = MAX_SIDE):
    """Draw a patch mask on an image, at a bounded size.

    The image is scaled by s = ``overlay_scale(H, W, max_side=max_side)``: upscaled by an integer
    (nearest) when small, reduced (box filter) when longer than ``max_side``; each pixel is darkened
    by its patch's mask value m (brightness ``dim + (1 - dim) * m``) and blended with the heat colour
    of m with weight ``alpha * m``; patches with m > ``threshold`` get a cyan outline; ``caption``
    lines go in a white strip below.

    Args:
        image: (H, W, 3) uint8 RGB.
        grid_mask: (h, w) mask values in [0, 1] on the patch grid (H and W need not be multiples).
        threshold: outline patches whose mask exceeds it.
        caption: text lines.
        alpha: heat-map opacity at mask 1.
        dim: brightness left to patches with mask 0.
        max_side: longest side of the drawn image (default 1024).

    Returns:
        PIL.Image (RGB) of size (w, h + caption_height(len(caption))) with (w, h) = (W*s, H*s)
        rounded (at least 1); with a caption, at least 256 px wide so the text shows.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    m = np.asarray(grid_mask, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"grid_mask must be (h, w), got shape {m.shape}")
    H, W = img.shape[:2]
    s = overlay_scale(H, W, max_side=max_side)
    h, w = m.shape
    if s >= 1:
        s = int(s)
        big = img.repeat(s, 0).repeat(s, 1).astype(np.float64)
    else:
        size = (max(1, round(W * s)), max(1, round(H * s)))
        big = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, resample=Image.Resampling.BOX,
                                                                           reducing_gap=2.0), dtype=np.float64)
    OH, OW = big.shape[:2]
    # Patch index of every output pixel row/column (patches tile the image evenly).
    rows = np.minimum((np.arange(OH) * h) // OH, h - 1)
    cols = np.minimum((np.arange(OW) * w) // OW, w - 1)
    mv = m[rows][:, cols]  # (OH, OW)
    mc = np.clip(mv, 0, 1)[..., None]
    base = big * (dim + (1 - dim) * mc)  # dim what the mask drops
    a = alpha * mc
    out = base * (1 - a) + heat_colors(mv) * a
    panel = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    ys = [int(round(i * OH / h)) for i in range(h + 1)]
    xs = [int(round(j * OW / w)) for j in range(w + 1)]
    kept = m > threshold
    lw = max(2, int(s) // 3)
    for i in range(h):
        for j in range(w):
            if not kept[i, j]:
                continue
            # Draw only the borders between kept and non-kept (or the image edge): one outline per region.
            if i == 0 or not kept[i - 1, j]:
                draw.line([(xs[j], ys[i]), (xs[j + 1] - 1, ys[i])], fill=_OUTLINE, width=lw)
            if i == h - 1 or not kept[i + 1, j]:
                draw.line([(xs[j], ys[i + 1] - 1), (xs[j + 1] - 1, ys[i + 1] - 1)], fill=_OUTLINE, width=lw)
            if j == 0 or not kept[i, j - 1]:
                draw.line([(xs[j], ys[i]), (xs[j], ys[i + 1] - 1)], fill=_OUTLINE, width=lw)
            if j == w - 1 or not kept[i, j + 1]:
                draw.line([(xs[j + 1] - 1, ys[i]), (xs[j + 1] - 1, ys[i + 1] - 1)], fill=_OUTLINE, width=lw)
    if not caption:
        return panel
    canvas = Image.new("RGB", (max(OW, _MIN_SIDE), OH + caption_height(len(caption))), (255, 255, 255))
    canvas.paste(panel, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, line in enumerate(caption):
        draw.text((_PAD, OH + _PAD + k * _LINE_HEIGHT), str(line), fill=(0, 0, 0), font=font)
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


def plot_overlay_grid(images: Sequence[np.ndarray], masks: dict, path, *, threshold: float = 0.5,
                      titles: Sequence[str] | None = None) -> None:
    """A grid of overlays: one row per image, one column per method.

    Args:
        images: uint8 (H, W, 3) images.
        masks: method name -> (n, h, w) scores per image (min-max normalised per image for display).
        path: output PNG path (written atomically).
        titles: optional per-row labels.
    """
    from ._io import atomic_path

    plt = _pyplot()
    names = list(masks)
    n = len(images)
    fig, axes = plt.subplots(n, len(names), figsize=(2.0 * len(names), 2.0 * n), squeeze=False)
    for i, img in enumerate(images):
        for j, name in enumerate(names):
            m = np.asarray(masks[name][i], dtype=np.float64)
            lo, hi = m.min(), m.max()
            shown = m if name == "diffmask" else (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
            axes[i, j].imshow(np.asarray(overlay(img, shown, threshold=threshold if name == "diffmask" else 2.0)))
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
