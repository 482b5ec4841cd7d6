"""Faithfulness metrics as pure functions: removal orders, perturbed images and logits, curve areas,
localisation scores.

Patches are removed in order of relevance in equal steps: most relevant first ("positive"
perturbation: the prediction should collapse fast, lower area is better) or least relevant first
("negative": the prediction should survive, higher area is better). Removed patches are replaced by
per-pixel uniform noise (the Vision DiffMask paper's setting) or by the image's per-channel mean.

All perturbed copies of a batch run through the backbone's batched patch-masking path: the patch
projection is linear per patch, so replacing a patch's pixels by r is replacing its embedding x by
e(r); with gates g in {0, 1}, g*x + (1-g)*e(r) = e(r) + g*(x - e(r)) (the conv bias cancels in the
difference). ``perturbed_logits`` does this; ``perturbed_logits_pixels`` is the pixel-space
reference it is tested against.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch

from ..backbone import patch_mask_reference

__all__ = [
    "REPLACEMENTS",
    "ORDERS",
    "auc",
    "removal_counts",
    "removal_gates",
    "replacement_pixels",
    "normalised_noise",
    "perturb_pixels",
    "perturbed_logits",
    "perturbed_logits_pixels",
    "localisation_counts",
    "prf",
    "insertion_deletion_gates",
    "gini",
    "entropy",
    "spearman",
    "patch_intensity",
]

REPLACEMENTS = ("noise", "mean")
ORDERS = ("positive", "negative")


# ----- arithmetic --------------------------------------------------------------------------------
def auc(curve, x=None) -> np.ndarray:
    """Trapezoid area under ``curve`` along its last axis.

    Args:
        curve: (..., K) values.
        x: (K,) abscissae, increasing; default K points evenly spaced on [0, 1].

    Returns:
        (...) areas (float64).
    """
    y = np.asarray(curve, dtype=np.float64)
    K = y.shape[-1]
    if K < 2:
        raise ValueError(f"a curve needs at least 2 points, got {K}")
    x = np.linspace(0.0, 1.0, K) if x is None else np.asarray(x, dtype=np.float64)
    if x.shape != (K,):
        raise ValueError(f"x must have shape ({K},), got {x.shape}")
    if np.any(np.diff(x) < 0):
        raise ValueError("x must be increasing")
    dx = np.diff(x)
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * dx).sum(-1)


def removal_counts(num_patches: int, steps: int) -> list[int]:
    """Patches removed at each of the steps+1 points: round(k * N / steps), k = 0..steps."""
    return [int(math.floor(k * num_patches / steps + 0.5)) for k in range(steps + 1)]


def removal_gates(scores: torch.Tensor, steps: int, order: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep gates for removing patches in order of relevance.

    Args:
        scores: (B, N) relevance (higher = more relevant).
        steps: number of equal steps.
        order: ``"positive"`` (most relevant removed first) or ``"negative"`` (least relevant first).
        generator: breaks ties between equal scores at random (CPU generator); without it, ties
            fall in patch order.

    Returns:
        (B, steps+1, N) float gates: 1 = kept, 0 = replaced; step k removes ``removal_counts[k]``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    B, N = scores.shape
    s = scores.detach().float().cpu()
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    key = -s if order == "positive" else s  # ascending sort of key = removal order
    if generator is not None:
        perm = torch.stack([torch.randperm(N, generator=generator) for _ in range(B)])
    else:
        perm = torch.arange(N).expand(B, N)
    ranked = torch.sort(key.gather(1, perm), dim=1, stable=True).indices
    removal = perm.gather(1, ranked)  # (B, N): patch removed at position j
    rank = torch.empty_like(removal).scatter_(1, removal, torch.arange(N).expand(B, N).contiguous())
    counts = torch.tensor(removal_counts(N, steps))
    gates = (rank.unsqueeze(1) >= counts.view(1, -1, 1)).float()  # (B, K, N)
    return gates.to(scores.device)


def replacement_pixels(pixel_values: torch.Tensor, mode: str, image_spec, seeds: Iterable[int]) -> torch.Tensor:
    """What removed patches are replaced by.

    Args:
        pixel_values: (B, 3, H, W) normalised pixels.
        mode: ``"noise"``: uniform noise over the valid raw pixel range, per pixel and channel,
            normalised like the images; ``"mean"``: each image's per-channel mean.
        image_spec: the backbone's ``ImageSpec`` (for the noise normalisation).
        seeds: one seed per image (noise), so every method sees the same noise for an image.

    Returns:
        (B, 3, H, W) replacement pixels.
    """
    if mode == "mean":
        return pixel_values.mean((2, 3), keepdim=True).expand_as(pixel_values).contiguous()
    if mode != "noise":
        raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {mode!r}")
    B, C, H, W = pixel_values.shape
    seeds = list(seeds)
    if len(seeds) != B:
        raise ValueError(f"need one noise seed per image ({B}), got {len(seeds)}")
    raw = torch.stack([torch.rand(C, H, W, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return normalised_noise(raw, image_spec).to(pixel_values.device, pixel_values.dtype)


def normalised_noise(raw: torch.Tensor, image_spec) -> torch.Tensor:
    """Uniform draws (B, 3, H, W) in [0, 1) -> noise pixels normalised like the images, on ``raw``'s device.

    u in [0, 1) is a raw pixel in [0, 255] after rescaling by 1/255; the processor's normalisation follows.
    """
    x = raw if image_spec.do_rescale else raw * 255.0
    if image_spec.do_normalize:
        mean = torch.tensor(image_spec.mean, device=raw.device).view(1, 3, 1, 1)
        x = (x - mean) / torch.tensor(image_spec.std, device=raw.device).view(1, 3, 1, 1)
    return x


def perturb_pixels(pixel_values: torch.Tensor, replacement: torch.Tensor, gates: torch.Tensor, patch_size) -> torch.Tensor:
    """Pixel-space perturbation: (B, 3, H, W), (B, 3, H, W), (B, K, N) -> (B*K, 3, H, W).

    Patch n (row-major over the grid) keeps its pixels where gates[b, k, n] = 1 and takes the
    replacement's pixels where it is 0 (values in between blend).
    """
    B, C, H, W = pixel_values.shape
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    K = gates.shape[1]
    g = gates.view(B, K, 1, gh, 1, gw, 1).expand(B, K, 1, gh, ph, gw, pw).reshape(B, K, 1, gh * ph, gw * pw)
    g = torch.nn.functional.pad(g, (0, W - gw * pw, 0, H - gh * ph), value=1.0).to(pixel_values.dtype)
    x, r = pixel_values.unsqueeze(1), replacement.unsqueeze(1)
    return (g * x + (1 - g) * r).reshape(B * K, C, H, W)


def perturbed_logits(backbone, pixel_values: torch.Tensor, replacement: torch.Tensor, gates: torch.Tensor,
                     *, patches: torch.Tensor | None = None, replacement_patches: torch.Tensor | None = None,
                     mask_fn: Callable | None = None) -> torch.Tensor:
    """Logits of many perturbed copies of each image through the batched patch-masking path.

    Args:
        backbone: ``vdm_engine.Backbone``.
        pixel_values: (B, 3, H, W).
        replacement: (B, 3, H, W) replacement pixels.
        gates: (B, K, N) keep gates (1 keep, 0 replace).
        patches, replacement_patches: optional precomputed ``embed_patches`` of the two (B, N, D).
        mask_fn: the patch-masking op (``Ops.patch_mask``); default the reference.

    Returns:
        (B, K, C) logits, equal to ``backbone(perturb_pixels(...))`` up to float rounding.
    """
    x = backbone.embed_patches(pixel_values) if patches is None else patches
    r = backbone.embed_patches(replacement) if replacement_patches is None else replacement_patches
    B, N, D = x.shape
    if gates.dim() != 3 or gates.shape[0] != B or gates.shape[2] != N:
        raise ValueError(f"gates must be (B={B}, K, N={N}), got {tuple(gates.shape)}")
    K = gates.shape[1]
    # g*x + (1-g)*r = r + g*(x - r): mask the difference with a zero placeholder, then add r back.
    tokens = (mask_fn or patch_mask_reference)(x - r, gates.to(x.dtype), None, backbone.cls_token, backbone.pos_embed)
    tokens = tokens.view(B, K, N + 1, D)
    tokens = torch.cat([tokens[:, :, :1], tokens[:, :, 1:] + r.unsqueeze(1)], dim=2).view(B * K, N + 1, D)
    return backbone.head(backbone.encode(backbone.complete_tokens(tokens))).view(B, K, -1)


def perturbed_logits_pixels(backbone, pixel_values, replacement, gates) -> torch.Tensor:
    """Reference for ``perturbed_logits``: build every perturbed image in pixel space. (B, K, C)."""
    B, K = gates.shape[:2]
    images = perturb_pixels(pixel_values, replacement, gates, backbone.patch_size)
    return backbone(images).view(B, K, -1)


# ----- localisation ------------------------------------------------------------------------------
def localisation_counts(kept: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Per-image (tp, fp, fn) of kept patches against the ground truth: (B, N) bools -> (B, 3)."""
    if kept.shape != relevant.shape:
        raise ValueError(f"kept {tuple(kept.shape)} and relevant {tuple(relevant.shape)} must have the same shape")
    kept, relevant = kept.bool(), relevant.bool().to(kept.device)
    tp = (kept & relevant).sum(-1)
    fp = (kept & ~relevant).sum(-1)
    fn = (~kept & relevant).sum(-1)
    return torch.stack([tp, fp, fn], -1).cpu()


def prf(counts) -> dict:
    """Precision, recall and F1 from (..., 3) (tp, fp, fn) counts.

    Returns micro scores (pooled counts over all images) and macro scores (mean over images with at
    least one relevant or kept patch; an image with neither is skipped). An empty denominator gives 0.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 3)

    def scores(tp, fp, fn):
        p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        r = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
        f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
        return p, r, f

    p, r, f = scores(*(c.sum(0)[i : i + 1] for i in range(3)))
    valid = c.sum(1) > 0
    mp, mr, mf = scores(c[valid, 0], c[valid, 1], c[valid, 2])
    mean = (lambda a: float(a.mean()) if a.size else 0.0)
    return {
        "precision": float(p[0]), "recall": float(r[0]), "f1": float(f[0]),
        "macro_precision": mean(mp), "macro_recall": mean(mr), "macro_f1": mean(mf),
        "tp": int(c[:, 0].sum()), "fp": int(c[:, 1].sum()), "fn": int(c[:, 2].sum()),
    }


def _topk_mask(scores: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) bool: the k[b] highest-scoring patches of each image (ties broken like removal)."""
    order_gates = removal_gates(scores, scores.shape[1], "positive", generator)  # step j removes j patches
    B = scores.shape[0]
    return order_gates[torch.arange(B), k.cpu().long()].to(scores.device) < 0.5


# ----- one patch at a time -----------------------------------------------------------------------
def insertion_deletion_gates(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep gates of the deletion and insertion games, one patch per step (all N steps).

    Deletion removes the most relevant patch first from the full image; insertion starts from the
    fully replaced image and restores the most relevant patch first. Both share one tie-breaking.

    Args:
        scores: (B, N) relevance.
        generator: breaks ties at random (see ``removal_gates``).

    Returns:
        (B, 2, N+1, N) float gates: [:, 0] deletion (step k: the k most relevant removed), [:, 1]
        insertion (step k: only the k most relevant kept).
    """
    deletion = removal_gates(scores, scores.shape[1], "positive", generator)
    return torch.stack([deletion, 1.0 - deletion], dim=1)


# ----- properties of the scores ------------------------------------------------------------------
def _magnitudes(scores) -> np.ndarray:
    a = np.abs(np.asarray(torch.as_tensor(scores).detach().cpu().double()))
    if a.ndim != 2:
        raise ValueError(f"scores must be (B, N), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("scores contain NaN or Inf")
    return a


def gini(scores) -> np.ndarray:
    """Sparseness: Gini index of each image's absolute patch scores (Chalasani et al. 2020).

    (B, N) -> (B,) in [0, 1 - 1/N]: 0 when every patch scores the same, 1 - 1/N when one patch holds
    all the mass. An all-zero row gives 0. With sorted magnitudes a_(1) <= ... <= a_(N):
    G = sum_k (2k - N - 1) a_(k) / (N sum_k a_(k)).
    """
    a = np.sort(_magnitudes(scores), axis=1)
    N = a.shape[1]
    k = np.arange(1, N + 1, dtype=np.float64)
    total = a.sum(1)
    num = ((2 * k - N - 1) * a).sum(1)
    return np.divide(num, N * total, out=np.zeros_like(total), where=total > 0)


def entropy(scores) -> np.ndarray:
    """Complexity: Shannon entropy (nats) of each image's absolute scores as a distribution over patches
    (Bhatt et al. 2020). (B, N) -> (B,) in [0, log N]; an all-zero row counts as uniform (log N)."""
    a = _magnitudes(scores)
    total = a.sum(1, keepdims=True)
    p = np.where(total > 0, a / np.where(total > 0, total, 1.0), 1.0 / a.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(1)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (1..N) along the last axis, ties sharing the mean of their positions."""
    order = np.argsort(a, axis=-1, kind="stable")
    s = np.take_along_axis(a, order, -1)
    B, N = s.shape
    ranks = np.empty_like(s, dtype=np.float64)
    for b in range(B):  # tie groups differ per row; N is the patch count, so this is cheap
        _, start, counts = np.unique(s[b], return_index=True, return_counts=True)
        avg = start + (counts + 1) / 2.0
        ranks[b, order[b]] = np.repeat(avg, counts)
    return ranks


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``.

    (B, N), (B, N) -> (B,) float64; ties get average ranks; a row constant in either input has no
    defined correlation and gives NaN.
    """
    x = np.asarray(torch.as_tensor(a).detach().cpu().double())
    y = np.asarray(torch.as_tensor(b).detach().cpu().double())
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"spearman needs two (B, N) arrays of one shape, got {x.shape} and {y.shape}")
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    return np.divide((rx * ry).sum(1), den, out=np.full(den.shape, np.nan), where=den > 0)


def patch_intensity(pixel_values: torch.Tensor, patch_size, kind: str = "mean") -> torch.Tensor:
    """Per-patch input statistics, for what the scores key on.

    Args:
        pixel_values: (B, C, H, W) normalised pixels (a per-channel affine map of the raw ones).
        patch_size: (ph, pw); pixels beyond the last full patch are ignored, as the patch embedding does.
        kind: ``"mean"`` (brightness: mean over the patch's pixels and channels) or ``"std"`` (contrast).

    Returns:
        (B, N) float32, patches row-major over the grid.
    """
    if kind not in ("mean", "std"):
        raise ValueError(f"kind must be 'mean' or 'std', got {kind!r}")
    B, C, H, W = pixel_values.shape
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    x = pixel_values[:, :, : gh * ph, : gw * pw].float().reshape(B, C, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
    return x.mean(-1) if kind == "mean" else x.std(-1)
