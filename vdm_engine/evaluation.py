"""Faithfulness of patch attributions: perturbation curves, their areas, and localisation scores.

For every image and method, patches are removed in order of relevance in equal steps (10% by
default): most relevant first ("positive" perturbation: the prediction should collapse fast, lower
area is better) and least relevant first ("negative": the prediction should survive, higher area
is better). Removed patches are replaced by per-pixel uniform noise (the Vision DiffMask paper's
setting) or by the image's per-channel mean. At every step we record the probability of the
originally predicted class and KL(original || perturbed), and integrate both over the removed
fraction (trapezoid rule).

All perturbed images of a batch run through the backbone's batched patch-masking path: the patch
projection is linear per patch, so replacing a patch's pixels by r is replacing its embedding x by
e(r); with gates g in {0, 1}, g*x + (1-g)*e(r) = e(r) + g*(x - e(r)) (the conv bias cancels in the
difference). ``perturbed_logits`` does this; ``perturbed_logits_pixels`` is the pixel-space
reference it is tested against.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from .explainer import kl_divergence

__all__ = [
    "REPLACEMENTS",
    "ORDERS",
    "PerturbationConfig",
    "auc",
    "removal_counts",
    "removal_gates",
    "replacement_pixels",
    "perturb_pixels",
    "perturbed_logits",
    "perturbed_logits_pixels",
    "localisation_counts",
    "prf",
    "evaluate",
    "EvalData",
    "check_data_spec",
    "load_eval_data",
    "evaluate_model",
    "paired_difference",
    "results_markdown",
    "write_report",
]

REPLACEMENTS = ("noise", "mean")
ORDERS = ("positive", "negative")


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of the perturbation test.

    Attributes:
        steps: number of equal removal steps (10 -> 0%, 10%, ..., 100% removed; steps+1 points).
        replacements: subset of ``REPLACEMENTS``.
        seed: seeds the noise (per image, shared by all methods) and the random tie-breaking.
        batch_size: images per attribution batch.
        max_rows: perturbed images per masked forward pass (bounds memory).
    """

    steps: int = 10
    replacements: tuple[str, ...] = REPLACEMENTS
    seed: int = 0
    batch_size: int = 32
    max_rows: int = 512

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"PerturbationConfig.steps must be >= 1, got {self.steps}")
        bad = [r for r in self.replacements if r not in REPLACEMENTS]
        if bad or not self.replacements:
            raise ValueError(
                f"PerturbationConfig.replacements must be a non-empty subset of {REPLACEMENTS}, got {self.replacements}"
            )
        if self.batch_size < 1:
            raise ValueError(f"PerturbationConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.max_rows < 1:
            raise ValueError(f"PerturbationConfig.max_rows must be >= 1, got {self.max_rows}")


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
    # u in [0, 1) is a raw pixel in [0, 255] after rescaling by 1/255; normalise like the processor.
    x = raw if image_spec.do_rescale else raw * 255.0
    if image_spec.do_normalize:
        x = (x - torch.tensor(image_spec.mean).view(1, 3, 1, 1)) / torch.tensor(image_spec.std).view(1, 3, 1, 1)
    return x.to(pixel_values.device, pixel_values.dtype)


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
                     *, patches: torch.Tensor | None = None, replacement_patches: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of many perturbed copies of each image through the batched patch-masking path.

    Args:
        backbone: ``vdm_engine.Backbone``.
        pixel_values: (B, 3, H, W).
        replacement: (B, 3, H, W) replacement pixels.
        gates: (B, K, N) keep gates (1 keep, 0 replace).
        patches, replacement_patches: optional precomputed ``embed_patches`` of the two (B, N, D).

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
    tokens = backbone.patch_mask_fn(x - r, gates.to(x.dtype), None, backbone.cls_token, backbone.pos_embed)
    tokens = tokens.view(B, K, N + 1, D)
    tokens = torch.cat([tokens[:, :, :1], tokens[:, :, 1:] + r.unsqueeze(1)], dim=2).view(B * K, N + 1, D)
    return backbone.head(backbone.encode(tokens)).view(B, K, -1)


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


# ----- the evaluation loop -----------------------------------------------------------------------
@torch.no_grad()
def _generator(*keys) -> torch.Generator:
    """A CPU generator seeded from integers and strings (method names): reproducible per method,
    whichever other methods run beside it."""
    h = 0
    for k in keys:
        h = zlib.crc32(str(k).encode(), h)
    return torch.Generator().manual_seed(h)


def _curves(backbone, pv, repl, target, orig_logits, score_sets: Mapping[str, torch.Tensor], steps, seed_keys, max_rows):
    """Probability and KL curves for every method and order: {method: {order: (prob (B,K), kl (B,K))}}."""
    x = backbone.embed_patches(pv)
    r = backbone.embed_patches(repl)
    B = pv.shape[0]
    K = steps + 1
    out = {}
    for name, scores in score_sets.items():
        generator = _generator(*seed_keys, name)
        gates = torch.cat([removal_gates(scores, steps, o, generator) for o in ORDERS], dim=1)  # (B, 2K, N)
        chunk = max(1, max_rows // gates.shape[1])
        logits = torch.cat([
            perturbed_logits(backbone, pv[i : i + chunk], repl[i : i + chunk], gates[i : i + chunk].to(x.device),
                             patches=x[i : i + chunk], replacement_patches=r[i : i + chunk])
            for i in range(0, B, chunk)
        ]).float()  # (B, 2K, C)
        prob = logits.softmax(-1).gather(2, target.view(B, 1, 1).expand(B, 2 * K, 1)).squeeze(-1)
        kl = kl_divergence(orig_logits.unsqueeze(1).expand_as(logits), logits).clamp(min=0)
        out[name] = {o: (prob[:, j * K : (j + 1) * K].cpu(), kl[:, j * K : (j + 1) * K].cpu()) for j, o in enumerate(ORDERS)}
    return out


def evaluate(
    methods: Mapping[str, Callable],
    backbone,
    pixel_values: torch.Tensor,
    *,
    relevant: torch.Tensor | None = None,
    config: PerturbationConfig = PerturbationConfig(),
    kept_masks: Mapping[str, Callable] | None = None,
    progress: bool = True,
) -> dict:
    """Run the perturbation test (and, with ground truth, the localisation test) for several methods.

    Args:
        methods: name -> attribution callable ``(pixel_values (B, 3, H, W), target (B,)) -> (B, N)``.
        backbone: the model whose predictions are explained.
        pixel_values: (M, 3, H, W) images (preprocessed), processed in batches of ``config.batch_size``.
        relevant: optional (M, N) bool ground-truth relevant patches (toy task): adds precision /
            recall / F1 of each method's top-k patches (k = true number of relevant patches).
        config: ``PerturbationConfig``.
        kept_masks: optional name -> function mapping that method's (B, N) scores to its own kept
            set (B, N) bool (DiffMask: keep probability > 0.5); scored as ``localisation['own']``.
        progress: show a tqdm bar.

    Returns:
        A JSON-serialisable dict: ``fractions`` (K,), ``n``, ``config`` and per method:
        ``{replacement: {order: {prob: (K,), kl: (K,), auc_prob, auc_kl, auc_prob_sem, auc_kl_sem}}}``,
        ``seconds_per_image`` (attribution time), and ``localisation`` when ``relevant`` is given.
    """
    from tqdm.auto import tqdm

    backbone.check_pixels(pixel_values)
    M, N = pixel_values.shape[0], backbone.num_patches
    if relevant is not None:
        relevant = torch.as_tensor(relevant).bool()
        if relevant.shape != (M, N):
            raise ValueError(f"relevant must be (M={M}, N={N}) bool, got {tuple(relevant.shape)}")
    if not methods:
        raise ValueError("no methods to evaluate")
    steps = config.steps
    fractions = np.array(removal_counts(N, steps), dtype=np.float64) / N
    names = list(methods)
    # per method / replacement / order: lists of per-image curves
    curves = {m: {rp: {o: {"prob": [], "kl": []} for o in ORDERS} for rp in config.replacements} for m in names}
    loc = {m: {"topk": []} for m in names}
    for m in (kept_masks or {}):
        if m in loc:
            loc[m]["own"] = []
    timing = {m: 0.0 for m in names}
    device = backbone.device
    bar = tqdm(total=M, desc="perturbation", unit="img", disable=not progress)
    for start in range(0, M, config.batch_size):
        pv = pixel_values[start : start + config.batch_size].to(device, backbone.dtype)
        B = pv.shape[0]
        idx = range(start, start + B)
        with torch.no_grad():
            orig = backbone(pv).float()
        target = orig.argmax(-1)
        scores = {}
        for m in names:
            t0 = time.perf_counter()
            s = methods[m](pv, target)
            timing[m] += time.perf_counter() - t0
            s = torch.as_tensor(s).float()
            if s.shape != (B, N) or not torch.isfinite(s).all():
                raise ValueError(f"method {m!r} returned {tuple(s.shape)} scores (finite: {bool(torch.isfinite(s).all())}); expected finite ({B}, {N})")
            scores[m] = s
        for rp in config.replacements:
            repl = replacement_pixels(pv, rp, backbone.image_spec, [config.seed * 1_000_003 + i for i in idx])
            res = _curves(backbone, pv, repl, target, orig, scores, steps, ("ties", config.seed, start), config.max_rows)
            for m in names:
                for o in ORDERS:
                    prob, kl = res[m][o]
                    curves[m][rp][o]["prob"].append(prob.numpy())
                    curves[m][rp][o]["kl"].append(kl.numpy())
        if relevant is not None:
            rel = relevant[start : start + B].to(device)
            k = rel.sum(-1)
            for m in names:
                gen = _generator("topk", config.seed, start, m)
                loc[m]["topk"].append(localisation_counts(_topk_mask(scores[m], k, gen), rel))
                if "own" in loc[m]:
                    loc[m]["own"].append(localisation_counts(kept_masks[m](scores[m]).bool(), rel))
        bar.update(B)
    bar.close()

    results = {}
    for m in names:
        entry = {}
        for rp in config.replacements:
            entry[rp] = {}
            for o in ORDERS:
                d = {}
                for key in ("prob", "kl"):
                    c = np.concatenate(curves[m][rp][o][key])  # (M, K)
                    areas = auc(c, fractions)
                    d[key] = c.mean(0).tolist()
                    d[f"auc_{key}"] = float(areas.mean())
                    d[f"auc_{key}_sem"] = float(areas.std(ddof=1) / math.sqrt(M)) if M > 1 else 0.0
                    d[f"auc_{key}_per_image"] = [round(float(a), 6) for a in areas]
                entry[rp][o] = d
        entry["seconds_per_image"] = timing[m] / M
        if relevant is not None:
            entry["localisation"] = {kind: prf(torch.cat(v).numpy()) for kind, v in loc[m].items()}
        results[m] = entry
    return {
        "n": int(M),
        "fractions": fractions.tolist(),
        "config": {"steps": steps, "replacements": list(config.replacements), "seed": config.seed},
        "methods": results,
    }


# ----- data, whole-model runs and reports ---------------------------------------------------------
TOY_EVAL_SEED = 7_000_001  # toy images for evaluation come from this seed (+ --seed), not the training pool's


@dataclass
class EvalData:
    """Images to evaluate on.

    Attributes:
        images: list of (H, W, 3) uint8 arrays (original resolution).
        pixel_values: (M, 3, H, W) preprocessed for the model.
        relevant: (M, N) bool ground-truth relevant patches (toy), else None.
        description: what was loaded, for the report.
    """

    images: list
    pixel_values: torch.Tensor
    relevant: torch.Tensor | None
    description: str


def check_data_spec(spec: str) -> None:
    """Raise ``ValueError`` unless ``spec`` names a data source (before anything heavy is loaded)."""
    spec = str(spec).strip()
    if spec in ("toy", "digits"):
        return
    for prefix in ("imagefolder:", "hf:"):
        if spec.startswith(prefix) and len(spec) > len(prefix):
            return
    raise ValueError(
        f"unknown data source {spec!r}; expected 'toy', 'digits', 'imagefolder:PATH' or 'hf:NAME[:SPLIT]'"
    )


def load_eval_data(spec: str, n: int, *, preprocess: Callable, grid: tuple[int, int], seed: int = 0) -> EvalData:
    """Load ``n`` evaluation images from a source spec (``vdm_engine.training.data``).

    ``digits``: the held-out ``test`` split (300 images, never used in training); ``toy``: fresh
    images from ``toy_batch(n, TOY_EVAL_SEED + seed)`` with their ground truth; ``imagefolder:PATH``:
    the first ``n`` files in sorted order; ``hf:NAME[:SPLIT]``: the first ``n`` streamed items.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    spec = str(spec).strip()
    from vdm_engine.training import data as D

    relevant = None
    if spec == "toy":
        images, _, rel = D.toy_batch(n, TOY_EVAL_SEED + seed)
        if tuple(D.TOY_GRID) != tuple(grid):
            raise ValueError(
                f"the toy ground truth is on a {D.TOY_GRID[0]}x{D.TOY_GRID[1]} patch grid, the model's grid is "
                f"{grid[0]}x{grid[1]}; evaluate toy data with a model trained on it (vit-toy)"
            )
        images, relevant = list(images), torch.from_numpy(rel)
        desc = f"toy: {n} fresh images (toy_batch seed {TOY_EVAL_SEED + seed})"
    elif spec == "digits":
        images, _ = D.digits_split("test")
        images = list(images[:n])
        desc = f"digits: {len(images)} held-out test-split images"
    else:
        source = D.open_source(spec, seed=seed)
        if source.indexed:
            if isinstance(source, D.ImageFolderSource):
                files = sorted(set(source.files) | set(source.val_files))[:n]  # val may repeat files
                images = [source._open(f) for f in files]
            else:
                images = list(source.images(np.arange(min(n, len(source)))))
        else:
            it = source.stream(seed=seed)
            images = [next(it) for _ in range(n)]
        desc = f"{spec}: {len(images)} images"
    images = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    return EvalData(images=images, pixel_values=preprocess(images), relevant=relevant, description=desc)


def evaluate_model(
    model: str,
    data: str,
    methods: Iterable[str],
    *,
    n: int = 500,
    gates: str | None = None,
    config: PerturbationConfig = PerturbationConfig(),
    ig_steps: int = 50,
    ig_baseline: str = "black",
    threshold: float = 0.5,
    device: str | None = None,
    allow_backbone_mismatch: bool = False,
    num_examples: int = 6,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Load a model with its gates and data, and run ``evaluate`` for the named methods.

    Returns:
        (results: JSON-serialisable dict with ``model``, ``data``, ``n``, ``seed``, checksums and
        ``evaluate``'s output; examples: {"images": [...], "scores": {method: (k, h, w)}, "labels"}
        for the first ``num_examples`` images, for figures).
    """
    import platform

    from . import __version__
    from .attribution import get_method
    from .explainer import Explainer

    from .attribution import METHODS

    names = [m.strip().lower() for m in methods if m.strip()]
    if not names:
        raise ValueError(f"no methods given; expected a comma-separated subset of {','.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods repeat: {names}")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method {unknown[0]!r}; expected one of {', '.join(METHODS)}")
    check_data_spec(data)
    explainer = Explainer.from_pretrained(
        model, gates=gates, device=device, allow_backbone_mismatch=allow_backbone_mismatch
    ).eval()
    bb = explainer.backbone
    options = {"ig": {"n_steps": ig_steps, "baseline": ig_baseline}, "random": {"seed": config.seed}}
    fns = {m: get_method(m, explainer, **options.get(m, {})) for m in names}
    ev = load_eval_data(data, n, preprocess=bb.preprocess, grid=bb.grid, seed=config.seed)
    kept = {"diffmask": (lambda s: s > threshold)} if "diffmask" in names else None
    res = evaluate(fns, bb, ev.pixel_values, relevant=ev.relevant, config=config, kept_masks=kept, progress=progress)
    res.update({
        "model": model,
        "data": data,
        "data_description": ev.description,
        "seed": config.seed,
        "threshold": threshold,
        "ig_steps": ig_steps if "ig" in names else None,
        "ig_baseline": ig_baseline if "ig" in names else None,
        "gates_sha256": explainer.gates.sha256,
        "gates_provenance": explainer.provenance.to_dict(),
        "environment": {
            "vdm_engine": __version__, "torch": torch.__version__, "device": str(bb.device),
            "cpu": platform.processor() or platform.machine(),
        },
    })
    k = min(num_examples, len(ev.images))
    examples = {"images": ev.images[:k], "scores": {}, "labels": []}
    if k:
        pv = ev.pixel_values[:k].to(bb.device)
        with torch.no_grad():
            pred = bb(pv).argmax(-1)
        examples["labels"] = [bb.id2label.get(int(c), str(int(c))) for c in pred]
        for m, fn in fns.items():
            examples["scores"][m] = fn(pv, pred).reshape(k, *bb.grid).cpu().numpy()
    return res, examples


_COLUMNS = [
    ("positive", "auc_prob", "pos. AUC prob (lower better)"),
    ("negative", "auc_prob", "neg. AUC prob (higher better)"),
    ("positive", "auc_kl", "pos. AUC KL (higher better)"),
    ("negative", "auc_kl", "neg. AUC KL (lower better)"),
]


def paired_difference(results: dict, method: str, reference: str, replacement: str, order: str,
                      key: str = "prob") -> tuple[float, float]:
    """Mean and standard error of the per-image AUC difference ``method - reference`` (same images)."""
    a = np.asarray(results["methods"][method][replacement][order][f"auc_{key}_per_image"])
    b = np.asarray(results["methods"][reference][replacement][order][f"auc_{key}_per_image"])
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def results_markdown(results: dict) -> str:
    """A markdown report: one AUC table per replacement setting, plus localisation when present."""
    lines = [
        f"# Faithfulness: {results.get('model', '?')} on {results.get('data', '?')}",
        "",
        f"{results.get('data_description', '')}; n = {results['n']}, seed {results.get('seed')}, "
        f"{len(results['fractions']) - 1} removal steps. AUCs over the removed fraction (0..1), "
        "mean ± standard error over images. Positive: most relevant patches removed first; negative: "
        "least relevant first.",
        "",
    ]
    extra = []
    if results.get("ig_steps"):
        extra.append(f"Integrated Gradients: {results['ig_steps']} steps, {results.get('ig_baseline', 'black')} baseline")
    if results.get("gates_sha256"):
        extra.append(f"gates sha256 {results['gates_sha256'][:16]}…")
    if "diffmask" in results["methods"]:
        extra.append(f"DiffMask kept patches: keep probability > {results.get('threshold', 0.5)}")
    if extra:
        lines += ["; ".join(extra) + ".", ""]
    methods = results["methods"]
    for rp in results["config"]["replacements"]:
        lines += [f"## Replacement: {rp}", "", "| method | " + " | ".join(c[2] for c in _COLUMNS) + " | s/image |",
                  "|---" * (len(_COLUMNS) + 2) + "|"]
        for m, e in methods.items():
            cells = [f"{e[rp][o][k]:.4f} ± {e[rp][o][k + '_sem']:.4f}" for o, k, _ in _COLUMNS]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {e['seconds_per_image'] * 1e3:.1f} ms |")
        lines.append("")
    if "diffmask" in methods and len(methods) > 1:
        lines += ["## Paired differences to DiffMask (AUC of P(original class), same images)", "",
                  "Mean ± standard error of the per-image difference method − DiffMask. Positive perturbation: "
                  "a negative difference means the method beats DiffMask; negative perturbation: a positive one.", "",
                  "| method | replacement | positive | negative |", "|---|---|---|---|"]
        for rp in results["config"]["replacements"]:
            for m in methods:
                if m == "diffmask":
                    continue
                cells = ["{:+.4f} ± {:.4f}".format(*paired_difference(results, m, "diffmask", rp, o)) for o in ORDERS]
                lines.append(f"| {m} | {rp} | " + " | ".join(cells) + " |")
        lines.append("")
    if any("localisation" in e for e in methods.values()):
        lines += ["## Localisation against the ground-truth relevant patches", "",
                  "top-k: each method's k highest-scoring patches, k = the image's true number of relevant "
                  "patches; own: DiffMask's kept patches (keep probability > threshold). Micro-averaged over "
                  "all patches; macro = mean over images with a relevant or kept patch.", "",
                  "| method | selection | precision | recall | F1 | macro F1 |", "|---|---|---|---|---|---|"]
        for m, e in methods.items():
            for kind, d in e.get("localisation", {}).items():
                lines.append(f"| {m} | {kind} | {d['precision']:.3f} | {d['recall']:.3f} | {d['f1']:.3f} | {d['macro_f1']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def write_report(results: dict, out_dir, examples: dict | None = None, *, plots: bool = True) -> list:
    """Write ``results.json``, ``results.md`` and (with matplotlib) ``curves_<replacement>.png`` and
    ``examples.png`` into ``out_dir``; returns the written paths."""
    from pathlib import Path

    from ._io import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    atomic_write_json(written[0], results)
    atomic_write_bytes(written[1], results_markdown(results).encode())
    if plots:
        from .visualize import plot_curves, plot_overlay_grid

        for rp in results["config"]["replacements"]:
            p = out / f"curves_{rp}.png"
            plot_curves(results, p, replacement=rp, title=f"{results.get('model')} on {results.get('data')}: "
                                                          f"{rp} replacement, n={results['n']}")
            written.append(p)
        if examples and examples.get("images"):
            p = out / "examples.png"
            plot_overlay_grid(examples["images"], examples["scores"], p, titles=examples.get("labels"))
            written.append(p)
    return written
