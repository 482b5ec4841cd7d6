"""The perturbation test over many images and methods, and whole-model runs from a model name.

For every image and method, ``evaluate`` removes patches in both orders (``metrics.removal_gates``),
records the probability of the originally predicted class and KL(original || perturbed) at every
step, and integrates both over the removed fraction (trapezoid rule). ``evaluate_model`` loads the
explainer, the attribution methods and the images (``load_eval_data``) and calls it.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from .. import data as D
from ..explainer import kl_divergence
from .metrics import (
    ORDERS,
    REPLACEMENTS,
    _topk_mask,
    auc,
    entropy,
    gini,
    insertion_deletion_gates,
    localisation_counts,
    patch_intensity,
    perturbed_logits,
    prf,
    removal_counts,
    removal_gates,
    replacement_pixels,
    spearman,
)
from .metric_names import DEFAULT_METRICS, METRICS, check_metrics
from .road import ROAD_NOISE, road_logits

__all__ = [
    "METRICS",
    "DEFAULT_METRICS",
    "check_metrics",
    "PerturbationConfig",
    "evaluate",
    "EvalData",
    "check_data_spec",
    "load_eval_data",
    "evaluate_model",
]


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of the perturbation test.

    Attributes:
        steps: number of equal removal steps (10 -> 0%, 10%, ..., 100% removed; steps+1 points).
        replacements: subset of ``REPLACEMENTS``.
        seed: seeds the noise (per image, shared by all methods) and the random tie-breaking.
        batch_size: images per attribution batch.
        max_rows: perturbed images per masked forward pass (bounds memory).
        road_noise: standard deviation of ROAD's imputation noise (normalised pixel units).
    """

    steps: int = 10
    replacements: tuple[str, ...] = REPLACEMENTS
    seed: int = 0
    batch_size: int = 32
    max_rows: int = 512
    road_noise: float = ROAD_NOISE

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
        if not self.road_noise >= 0:
            raise ValueError(f"PerturbationConfig.road_noise must be >= 0, got {self.road_noise}")


# ----- the evaluation loop -----------------------------------------------------------------------
@torch.no_grad()
def _generator(*keys) -> torch.Generator:
    """A CPU generator seeded from integers and strings (method names): reproducible per method,
    whichever other methods run beside it."""
    h = 0
    for k in keys:
        h = zlib.crc32(str(k).encode(), h)
    return torch.Generator().manual_seed(h)


def _curves(backbone, pv, repl, target, orig_logits, score_sets: Mapping[str, torch.Tensor], steps, seed_keys, max_rows,
            mask_fn=None):
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
                             patches=x[i : i + chunk], replacement_patches=r[i : i + chunk], mask_fn=mask_fn)
            for i in range(0, B, chunk)
        ]).float()  # (B, 2K, C)
        prob = logits.softmax(-1).gather(2, target.view(B, 1, 1).expand(B, 2 * K, 1)).squeeze(-1)
        kl = kl_divergence(orig_logits.unsqueeze(1).expand_as(logits), logits).clamp(min=0)
        out[name] = {o: (prob[:, j * K : (j + 1) * K].cpu(), kl[:, j * K : (j + 1) * K].cpu()) for j, o in enumerate(ORDERS)}
    return out


def _target_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, K, C) logits, (B,) classes -> (B, K) probability of each image's class."""
    B, K = logits.shape[:2]
    return logits.float().softmax(-1).gather(2, target.view(B, 1, 1).expand(B, K, 1)).squeeze(-1).cpu()


def _masked_probs(backbone, pv, x, r, gates, target, max_rows, mask_fn) -> torch.Tensor:
    """Probability of the target class for (B, K, N) keep gates, K rows per image in chunks: (B, K)."""
    B, K = gates.shape[:2]
    chunk = max(1, max_rows // K)
    logits = torch.cat([
        perturbed_logits(backbone, pv[i : i + chunk], None, gates[i : i + chunk].to(x.device), patches=x[i : i + chunk],
                         replacement_patches=r[i : i + chunk], mask_fn=mask_fn)
        for i in range(0, B, chunk)
    ])
    return _target_prob(logits, target)


def _area(curves: list, x) -> dict:
    """Per-image curves (list of (B, K)) -> mean curve, mean AUC, its standard error and per-image AUCs."""
    c = np.concatenate(curves)
    areas = auc(c, x)
    M = c.shape[0]
    return {"prob": c.mean(0).tolist(), "auc": float(areas.mean()),
            "auc_sem": float(areas.std(ddof=1) / math.sqrt(M)) if M > 1 else 0.0,
            "auc_per_image": [round(float(a), 6) for a in areas]}


def _per_image(values: list) -> dict:
    v = np.concatenate(values).astype(np.float64)
    ok = v[np.isfinite(v)]
    return {"mean": float(ok.mean()) if ok.size else float("nan"),
            "sem": float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else 0.0,
            "n": int(ok.size), "per_image": [round(float(a), 6) if np.isfinite(a) else None for a in v]}


def evaluate(
    methods: Mapping[str, Callable],
    backbone,
    pixel_values: torch.Tensor,
    *,
    relevant: torch.Tensor | None = None,
    config: PerturbationConfig = PerturbationConfig(),
    kept_masks: Mapping[str, Callable] | None = None,
    progress: bool = True,
    mask_fn: Callable | None = None,
    precomputed: Mapping[str, torch.Tensor] | None = None,
    metrics: Iterable[str] = ("perturbation",),
) -> dict:
    """Run the faithfulness metrics (and, with ground truth, the localisation test) for several methods.

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
        mask_fn: the patch-masking op of the perturbed passes (``Ops.patch_mask``); default the reference.
        precomputed: optional name -> (M, N) scores used for that method instead of calling it (masks
            from a bulk run); its ``seconds_per_image`` is then 0.
        metrics: names from ``METRICS`` but ``randomisation``: ``perturbation`` (the curves above, in
            ``config.steps`` steps), ``insertion-deletion`` (one patch at a time, all N steps, per
            replacement), ``road`` (noisy linear imputation, most/least relevant first, removed
            fractions 0..(steps-1)/steps: removing everything leaves nothing to impute from),
            ``sparseness`` (Gini), ``complexity`` (entropy), ``intensity`` (Spearman of the scores
            with the patches' mean input intensity).

    Returns:
        A JSON-serialisable dict: ``fractions`` (K,), ``n``, ``config``, ``metrics`` and per method:
        ``{replacement: {order: {prob: (K,), kl: (K,), auc_prob, auc_kl, auc_prob_sem, auc_kl_sem}}}``
        (perturbation), ``insertion_deletion: {replacement: {deletion|insertion: {prob, auc, auc_sem,
        auc_per_image}}}``, ``road: {positive|negative: {...}}`` (with top-level ``road_fractions``),
        ``sparseness`` / ``complexity`` / ``intensity``: ``{mean, sem, n, per_image}``,
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
    metrics = tuple(m for m in check_metrics(metrics) if m != "randomisation")
    if not metrics:
        raise ValueError("evaluate measures every metric but 'randomisation' (evaluate_model runs that one)")
    steps = config.steps
    fractions = np.array(removal_counts(N, steps), dtype=np.float64) / N
    names = list(methods)
    # per method / replacement / order: lists of per-image curves
    curves = {m: {rp: {o: {"prob": [], "kl": []} for o in ORDERS} for rp in config.replacements} for m in names}
    games = ("deletion", "insertion")
    ins_del = {m: {rp: {g: [] for g in games} for rp in config.replacements} for m in names}
    road = {m: {o: [] for o in ORDERS} for m in names}
    road_counts = removal_counts(N, steps)[:-1]
    props = {m: {p: [] for p in ("sparseness", "complexity", "intensity")} for m in names}
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
            if precomputed is not None and m in precomputed:
                s = precomputed[m][start : start + B]
            else:
                t0 = time.perf_counter()
                s = methods[m](pv, target)
                timing[m] += time.perf_counter() - t0
            s = torch.as_tensor(s).float()
            if s.shape != (B, N) or not torch.isfinite(s).all():
                raise ValueError(f"method {m!r} returned {tuple(s.shape)} scores (finite: {bool(torch.isfinite(s).all())}); expected finite ({B}, {N})")
            scores[m] = s
        for rp in config.replacements:
            repl = replacement_pixels(pv, rp, backbone.image_spec, [config.seed * 1_000_003 + i for i in idx])
            if "perturbation" in metrics:
                res = _curves(backbone, pv, repl, target, orig, scores, steps, ("ties", config.seed, start),
                              config.max_rows, mask_fn)
                for m in names:
                    for o in ORDERS:
                        prob, kl = res[m][o]
                        curves[m][rp][o]["prob"].append(prob.numpy())
                        curves[m][rp][o]["kl"].append(kl.numpy())
            if "insertion-deletion" in metrics:
                with torch.no_grad():
                    x, r = backbone.embed_patches(pv), backbone.embed_patches(repl)
                    for m in names:
                        g = insertion_deletion_gates(scores[m], _generator("one-by-one", config.seed, start, m))
                        prob = _masked_probs(backbone, pv, x, r, g.flatten(1, 2), target, config.max_rows, mask_fn)
                        for j, game in enumerate(games):
                            ins_del[m][rp][game].append(prob[:, j * (N + 1) : (j + 1) * (N + 1)].numpy())
        if "road" in metrics:
            seeds = [config.seed * 1_000_003 + i for i in idx]
            for m in names:
                gen = _generator("road", config.seed, start, m)
                g = torch.cat([removal_gates(scores[m], steps, o, gen)[:, :-1] for o in ORDERS], dim=1)
                logits = road_logits(backbone, pv, g, noise=config.road_noise, seeds=seeds, max_rows=config.max_rows)
                prob = _target_prob(logits, target)
                K = len(road_counts)
                for j, o in enumerate(ORDERS):
                    road[m][o].append(prob[:, j * K : (j + 1) * K].numpy())
        if "intensity" in metrics:
            intensity = patch_intensity(pv, backbone.patch_size)
        for m in names:
            if "sparseness" in metrics:
                props[m]["sparseness"].append(gini(scores[m]))
            if "complexity" in metrics:
                props[m]["complexity"].append(entropy(scores[m]))
            if "intensity" in metrics:
                props[m]["intensity"].append(spearman(scores[m], intensity))
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
    one_by_one = np.arange(N + 1, dtype=np.float64) / N
    road_fractions = np.array(road_counts, dtype=np.float64) / N
    for m in names:
        entry = {}
        for rp in (config.replacements if "perturbation" in metrics else ()):
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
        if "insertion-deletion" in metrics:
            entry["insertion_deletion"] = {rp: {g: _area(ins_del[m][rp][g], one_by_one) for g in games}
                                           for rp in config.replacements}
        if "road" in metrics:
            entry["road"] = {o: _area(road[m][o], road_fractions) for o in ORDERS}
        for p in ("sparseness", "complexity", "intensity"):
            if p in metrics:
                entry[p] = _per_image(props[m][p])
        entry["seconds_per_image"] = timing[m] / M
        if relevant is not None:
            entry["localisation"] = {kind: prf(torch.cat(v).numpy()) for kind, v in loc[m].items()}
        results[m] = entry
    return {
        "n": int(M),
        "fractions": fractions.tolist(),
        "config": {"steps": steps, "replacements": list(config.replacements), "seed": config.seed,
                   "road_noise": config.road_noise},
        "metrics": list(metrics),
        **({"road_fractions": road_fractions.tolist()} if "road" in metrics else {}),
        "methods": results,
    }


# ----- data and whole-model runs -----------------------------------------------------------------
TOY_EVAL_SEED = 7_000_001  # toy images for evaluation come from this seed (+ --seed), not the training pool's


@dataclass
class EvalData:
    """Images to evaluate on.

    Attributes:
        images: list of (H, W, 3) uint8 arrays (original resolution).
        pixel_values: (M, 3, H, W) preprocessed for the model.
        relevant: (M, N) bool ground-truth relevant patches (toy), else None.
        description: what was loaded, for the report.
        ids: the images' stable ids (``vdm_engine.data``: ``digits_ids``, ``toy_ids``, ``file_id``), as
            a bulk run names them; None for streamed sources.
    """

    images: list
    pixel_values: torch.Tensor
    relevant: torch.Tensor | None
    description: str
    ids: list[str] | None = None


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
    """Load ``n`` evaluation images from a source spec (``vdm_engine.data``).

    ``digits``: the held-out ``test`` split (300 images, never used in training); ``toy``: fresh
    images from ``toy_batch(n, TOY_EVAL_SEED + seed)`` with their ground truth; ``imagefolder:PATH``:
    the first ``n`` files in sorted order; ``hf:NAME[:SPLIT]``: the first ``n`` streamed items.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    spec = str(spec).strip()
    relevant, ids = None, None
    if spec == "toy":
        images, _, rel = D.toy_batch(n, TOY_EVAL_SEED + seed)
        ids = D.toy_ids(n, TOY_EVAL_SEED + seed)
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
        ids = D.digits_ids("test")[:n]
        desc = f"digits: {len(images)} held-out test-split images"
    else:
        source = D.open_source(spec, seed=seed)
        if source.indexed:
            if isinstance(source, D.ImageFolderSource):
                files = sorted(set(source.files) | set(source.val_files))[:n]  # val may repeat files
                images = [source._open(f) for f in files]
                ids = [D.file_id(f, source.root) for f in files]
            else:
                images = list(source.images(np.arange(min(n, len(source)))))
        else:
            it = source.stream(seed=seed)
            images = [next(it) for _ in range(n)]
        desc = f"{spec}: {len(images)} images"
    images = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    return EvalData(images=images, pixel_values=preprocess(images), relevant=relevant, description=desc, ids=ids)


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
    metrics: Iterable[str] = DEFAULT_METRICS,
    randomise_blocks: Iterable[int] | None = None,
    retrain: Callable | None = None,
    path_gates: str | None = None,
    diffmask_from=None,
) -> tuple[dict, dict]:
    """Load a model with its gates and data, and run ``evaluate`` for the named methods.

    ``metrics`` selects from ``METRICS``. ``randomisation`` runs ``randomisation_test`` on the same
    images for the top ``randomise_blocks`` blocks (default 1..L); DiffMask is scored there with the
    trained gates reading the randomised model (``diffmask``) and, when ``retrain`` is given
    (``retrain(explainer_on_randomised_model) -> Gates``, e.g. a short ``vdm_engine.training`` run; the core
    does not import training itself), with gates retrained on it (``diffmask-retrained``).
    ``diffmask-path`` reads K-level gates from ``path_gates`` (default: the embedded model's
    ``gates-levels``).

    ``diffmask_from``: DiffMask masks made earlier (a bulk run's ``read_masks``: ``masks`` {id: (N,)},
    ``grid``, ``gates_sha256``), used instead of recomputing them; matched to the images by id and
    refused when made with other gates.

    Returns:
        (results: JSON-serialisable dict with ``model``, ``data``, ``n``, ``seed``, checksums and
        ``evaluate``'s output; examples: {"images": [...], "scores": {method: (k, h, w)}, "labels",
        with DiffMask "kept" (k, h, w) bool and "depths" (k, L+2, h, w), with ground truth "truth"
        (k, h, w) bool} for the first ``num_examples`` images, for figures).
    """
    import platform

    from .. import __version__
    from ..attribution import METHODS, get_method
    from ..explainer import Explainer

    names = [m.strip().lower() for m in methods if m.strip()]
    if not names:
        raise ValueError(f"no methods given; expected a comma-separated subset of {','.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods repeat: {names}")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method {unknown[0]!r}; expected one of {', '.join(METHODS)}")
    check_data_spec(data)
    metrics = check_metrics(metrics)
    explainer = Explainer.from_pretrained(
        model, gates=gates, device=device, allow_backbone_mismatch=allow_backbone_mismatch
    ).eval()
    bb = explainer.backbone
    options = {"ig": {"n_steps": ig_steps, "baseline": ig_baseline}, "random": {"seed": config.seed}}
    path_explainer = None
    if "diffmask-path" in names:
        from ..models import embedded_levels_dir

        where = path_gates or embedded_levels_dir(str(model))
        if where is None:
            raise ValueError(f"diffmask-path needs K-level gates: '{model}' ships none; pass path_gates=DIR (--path-gates)")
        from ..gates import Gates

        levels = Gates.from_pretrained(where, source="path" if path_gates else "shipped")
        path_explainer = Explainer(bb, levels, allow_backbone_mismatch=allow_backbone_mismatch).eval()
    fns = {m: get_method(m, path_explainer if m == "diffmask-path" else explainer, **options.get(m, {})) for m in names}
    ev = load_eval_data(data, n, preprocess=bb.preprocess, grid=bb.grid, seed=config.seed)
    kept = {"diffmask": (lambda s: s > threshold)} if "diffmask" in names else None
    pre = None
    if diffmask_from is not None:
        pre = {"diffmask": _stored_masks(diffmask_from, ev, explainer, names)}
    curve_metrics = [m for m in metrics if m != "randomisation"]
    if curve_metrics:
        res = evaluate(fns, bb, ev.pixel_values, relevant=ev.relevant, config=config, kept_masks=kept,
                       progress=progress, mask_fn=explainer.ops.patch_mask, metrics=curve_metrics, precomputed=pre)
    else:
        res = {"n": int(ev.pixel_values.shape[0]), "config": {"steps": config.steps, "seed": config.seed,
               "replacements": list(config.replacements)}, "metrics": [], "methods": {m: {} for m in names}}
    if pre is not None:
        res["diffmask_from"] = str(getattr(diffmask_from, "source", "") or "") or None
    if "randomisation" in metrics:
        res["randomisation"] = _randomisation(explainer, fns, path_explainer, names, options, ev.pixel_values, config,
                                              randomise_blocks, retrain)
        res["metrics"] = list(res["metrics"]) + ["randomisation"]
    res.update({
        "model": model,
        "data": data,
        "data_description": ev.description,
        "seed": config.seed,
        "threshold": threshold,
        "ig_steps": ig_steps if "ig" in names else None,
        "ig_baseline": ig_baseline if "ig" in names else None,
        "gates_sha256": explainer.gates.sha256,
        **({"path_gates_sha256": path_explainer.gates.sha256, "path_gates_provenance": path_explainer.provenance.to_dict(),
            "path_levels": path_explainer.gates.config.levels} if path_explainer is not None else {}),
        "gates_provenance": explainer.provenance.to_dict(),
        "environment": {
            "vdm_engine": __version__, "torch": torch.__version__, "device": str(bb.device),
            "cpu": platform.processor() or platform.machine(),
        },
    })
    res.setdefault("fractions", [])
    k = min(num_examples, len(ev.images))
    examples = {"images": ev.images[:k], "scores": {}, "labels": []}
    if k:
        pv = ev.pixel_values[:k].to(bb.device)
        with torch.no_grad():
            pred = bb(pv).argmax(-1)
        examples["labels"] = [bb.id2label.get(int(c), str(int(c))) for c in pred]
        for m, fn in fns.items():
            s = pre[m][:k] if pre is not None and m in pre else fn(pv, pred)
            examples["scores"][m] = s.reshape(k, *bb.grid).cpu().numpy()
        if "diffmask" in examples["scores"]:
            examples["kept"] = examples["scores"]["diffmask"] > threshold
            with torch.no_grad():
                lm = explainer.explain(pv).layer_masks
            examples["depths"] = lm.reshape(k, lm.shape[1], *bb.grid).float().cpu().numpy()
        if ev.relevant is not None:
            examples["truth"] = np.asarray(ev.relevant[:k], dtype=bool).reshape(k, *bb.grid)
    return res, examples


def _stored_masks(stored, ev: EvalData, explainer, names: list[str]) -> torch.Tensor:
    """(M, N) DiffMask scores for ``ev``'s images from ``stored`` (by id); ``ValueError`` when they cannot be."""
    if "diffmask" not in names:
        raise ValueError("masks from a bulk run replace the 'diffmask' method; add diffmask to the methods")
    if stored.gates_sha256 != explainer.gates.sha256:
        raise ValueError(f"the stored masks were made with gates {str(stored.gates_sha256)[:12]}, this evaluation "
                         f"loads gates {str(explainer.gates.sha256)[:12]}; evaluate with the run's model and gates")
    if tuple(stored.grid) != tuple(explainer.grid):
        raise ValueError(f"the stored masks are on a {stored.grid} patch grid, the model's is {explainer.grid}")
    if ev.ids is None:
        raise ValueError(f"{ev.description}: streamed images have no stable ids to match stored masks by")
    missing = [i for i in ev.ids if i not in stored.masks]
    if missing:
        raise ValueError(f"{len(missing)} of {len(ev.ids)} images have no stored mask (first: {missing[0]!r}); "
                         "explain the same images in the bulk run")
    return torch.from_numpy(np.stack([stored.masks[i] for i in ev.ids])).float()


def _randomisation(explainer, fns, path_explainer, names, options, pixel_values, config, ks, retrain) -> dict:
    """``randomisation_test`` for the named methods; DiffMask with the trained and, if asked, retrained gates."""
    import copy
    import warnings

    from ..attribution import get_method
    from ..explainer import Explainer
    from ..provenance import ProvenanceWarning
    from .randomisation import randomisation_test

    trained = explainer.backbone

    def build(bb):
        if bb is trained:
            return dict(fns)
        with warnings.catch_warnings():  # the trained gates on a randomised copy: another backbone, on purpose
            warnings.simplefilter("ignore", ProvenanceWarning)
            # a copy: accepting the mismatch marks the gates' provenance, and the trained explainer keeps its own
            on_random = Explainer(bb, copy.deepcopy(explainer.gates), allow_backbone_mismatch=True).eval()
        made = {m: get_method(m, on_random, **options.get(m, {})) for m in names if m != "diffmask-path"}
        if "diffmask-path" in names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ProvenanceWarning)
                path_on_random = Explainer(bb, copy.deepcopy(path_explainer.gates), allow_backbone_mismatch=True).eval()
            made["diffmask-path"] = get_method("diffmask-path", path_on_random)
        if retrain is not None and "diffmask" in names:
            made["diffmask-retrained"] = get_method("diffmask", Explainer(bb, retrain(on_random)).eval())
        return made

    t0 = time.perf_counter()
    out = randomisation_test(trained, pixel_values, build, ks=ks, seed=config.seed, batch_size=config.batch_size,
                             reference={"diffmask-retrained": "diffmask"})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["retrained"] = retrain is not None and "diffmask" in names
    return out
