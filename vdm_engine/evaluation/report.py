"""Reports of evaluation results: paired differences, a markdown summary, the files on disk."""

from __future__ import annotations

import math

import numpy as np

from .metrics import ORDERS

__all__ = ["level_with_best", "paired_difference", "results_markdown", "versus_best_baseline", "versus_best_baselines",
           "write_report"]

#: Methods that are not baselines for ``versus_best_baseline``: DiffMask's own rows and the floor.
NOT_BASELINES = ("diffmask", "diffmask-path", "diffmask-retrained", "random")

_COLUMNS = [
    ("positive", "auc_prob", "pos. AUC prob (lower better)"),
    ("negative", "auc_prob", "neg. AUC prob (higher better)"),
    ("positive", "auc_kl", "pos. AUC KL (higher better)"),
    ("negative", "auc_kl", "neg. AUC KL (lower better)"),
]


def _mean_sem(d: np.ndarray) -> tuple[float, float]:
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def paired_difference(results: dict, method: str, reference: str, replacement: str, order: str,
                      key: str = "prob") -> tuple[float, float]:
    """Mean and standard error of the per-image AUC difference ``method - reference`` (same images)."""
    a = np.asarray(results["methods"][method][replacement][order][f"auc_{key}_per_image"])
    b = np.asarray(results["methods"][reference][replacement][order][f"auc_{key}_per_image"])
    return _mean_sem(a - b)


def _per_image_aucs(entry: dict, metric: str, setting: str | None, curve: str) -> np.ndarray | None:
    """Per-image AUCs of one curve of one method, or None when it was not measured."""
    try:
        if metric == "perturbation":
            return np.asarray(entry[setting][curve]["auc_prob_per_image"])
        if metric == "insertion-deletion":
            return np.asarray(entry["insertion_deletion"][setting][curve]["auc_per_image"])
        return np.asarray(entry["road"][curve]["auc_per_image"])
    except KeyError:
        return None


def _references(methods: dict) -> list[str]:
    return [m for m in ("diffmask-path", "diffmask") if m in methods]


def _settings(results: dict) -> list[tuple]:
    """(metric, replacement or None, (most relevant first curve, least relevant first curve)) of every test."""
    reps = results["config"].get("replacements", [])
    return [("perturbation", rp, ("positive", "negative")) for rp in reps] + \
           [("insertion-deletion", rp, ("deletion", "insertion")) for rp in reps] + \
           [("road", None, ("positive", "negative"))]


def _curve_label(metric: str, setting: str | None, curve: str) -> str:
    if metric == "road":
        return {"positive": "ROAD MoRF", "negative": "ROAD LeRF"}[curve]
    return f"{curve}, {setting}"


def level_with_best(lower_better: bool, auc: float, best_auc: float, best_sem: float, diff: float,
                    diff_sem: float) -> tuple[bool, float]:
    """Whether a method's curve is at least level with the best baseline's, and by how much it misses (>= 0).

    Most relevant first (``lower_better``): met when ``auc - best_auc <= best_sem`` (within one standard
    error of the best). Least relevant first / insertion: met when ``diff + 1.96 diff_sem >= 0``, ``diff`` the
    mean paired difference method - best (the 95% interval includes or exceeds 0).
    """
    miss = auc - best_auc - best_sem if lower_better else -(diff + 1.96 * diff_sem)
    return bool(miss <= 0), round(max(0.0, float(miss)), 4)


def versus_best_baseline(results: dict, method: str) -> list[dict]:
    """``method`` against the best baseline of every curve measured (``level_with_best``).

    Baselines: every method but ``NOT_BASELINES``; the best has the lowest mean AUC on a most-relevant-first
    curve, the highest on the others. Returns one dict per curve: curve, metric, replacement, order,
    auc/sem of ``method``, best, best_auc/best_sem, diff/diff_sem (paired, method - best), met, miss.
    """
    methods = results["methods"]
    baselines = [m for m in methods if m not in NOT_BASELINES]
    rows = []
    for metric, rp, orders in _settings(results):
        for i, curve in enumerate(orders):
            a = _per_image_aucs(methods[method], metric, rp, curve)
            scored = {b: x for b in baselines if (x := _per_image_aucs(methods[b], metric, rp, curve)) is not None}
            if a is None or not scored:
                continue
            lower = i == 0
            best = (min if lower else max)(scored, key=lambda b: float(scored[b].mean()))
            auc, sem = _mean_sem(a)
            best_auc, best_sem = _mean_sem(scored[best])
            diff, diff_sem = _mean_sem(a - scored[best])
            met, miss = level_with_best(lower, auc, best_auc, best_sem, diff, diff_sem)
            rows.append({"curve": _curve_label(metric, rp, curve), "metric": metric, "replacement": rp, "order": curve,
                         "auc": auc, "sem": sem, "best": best, "best_auc": best_auc, "best_sem": best_sem,
                         "diff": diff, "diff_sem": diff_sem, "met": met, "miss": miss})
    return rows


def versus_best_baselines(results: dict) -> dict[str, list[dict]]:
    """``versus_best_baseline`` of DiffMask path and DiffMask, those measured beside other methods (what
    results.json, results.md and ``vdm-eval``'s summary report)."""
    methods = results["methods"]
    return {m: versus_best_baseline(results, m) for m in _references(methods)} if len(methods) > 1 else {}


def _paired_rows(results: dict, reference: str) -> list[str]:
    """Paired-difference rows (method - reference) for every curve measured."""
    methods = results["methods"]
    settings = _settings(results)
    lines = []
    for metric, rp, (worse_first, better_first) in settings:
        for m, e in methods.items():
            if m == reference:
                continue
            cells = []
            for curve in (worse_first, better_first):
                a, b = _per_image_aucs(e, metric, rp, curve), _per_image_aucs(methods[reference], metric, rp, curve)
                if a is None or b is None:
                    break
                cells.append("{:+.4f} ± {:.4f}".format(*_mean_sem(a - b)))
            if len(cells) == 2:
                label = {"perturbation": f"perturbation, {rp}", "insertion-deletion": f"deletion / insertion, {rp}",
                         "road": "ROAD MoRF / LeRF"}[metric]
                lines.append(f"| {m} | {label} | " + " | ".join(cells) + " |")
    return lines


def results_markdown(results: dict) -> str:
    """A markdown report: a table per metric measured, paired differences to DiffMask, localisation
    and the randomisation test when present."""
    metrics = results.get("metrics", ["perturbation"])
    steps = len(results.get("fractions", [])) - 1
    lines = [
        f"# Faithfulness: {results.get('model', '?')} on {results.get('data', '?')}",
        "",
        f"{results.get('data_description', '')}; n = {results['n']}, seed {results.get('seed')}; metrics: "
        f"{', '.join(metrics)}. Mean ± standard error over images throughout.",
        "",
    ]
    extra = []
    if results.get("ig_steps"):
        extra.append(f"Integrated Gradients: {results['ig_steps']} steps, {results.get('ig_baseline', 'black')} baseline")
    if results.get("gates_sha256"):
        extra.append(f"gates sha256 {results['gates_sha256'][:16]}…")
    if "diffmask" in results["methods"]:
        extra.append(f"DiffMask kept patches: keep probability > {results.get('threshold', 0.5)}")
    if results.get("path_gates_sha256"):
        extra.append(f"DiffMask path gates sha256 {results['path_gates_sha256'][:16]}…")
    if extra:
        lines += ["; ".join(extra) + ".", ""]
    methods = results["methods"]
    if "perturbation" in metrics:
        lines += [f"Perturbation: {steps} removal steps, AUCs over the removed fraction (0..1). Positive: most "
                  "relevant patches removed first; negative: least relevant first.", ""]
        for rp in results["config"]["replacements"]:
            lines += [f"## Replacement: {rp}", "", "| method | " + " | ".join(c[2] for c in _COLUMNS) + " | s/image |",
                      "|---" * (len(_COLUMNS) + 2) + "|"]
            for m, e in methods.items():
                if rp not in e:
                    continue
                cells = [f"{e[rp][o][k]:.4f} ± {e[rp][o][k + '_sem']:.4f}" for o, k, _ in _COLUMNS]
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {e['seconds_per_image'] * 1e3:.1f} ms |")
            lines.append("")
    if "insertion-deletion" in metrics:
        lines += ["## Insertion and deletion, one patch at a time", "",
                  "AUC of P(original class) over all N steps. Deletion removes the most relevant patch first from "
                  "the image (lower better); insertion restores the most relevant patch first into the fully "
                  "replaced image (higher better).", "",
                  "| method | replacement | deletion AUC (lower better) | insertion AUC (higher better) |",
                  "|---|---|---|---|"]
        for rp in results["config"]["replacements"]:
            for m, e in methods.items():
                d = e.get("insertion_deletion", {}).get(rp)
                if d:
                    lines.append(f"| {m} | {rp} | {d['deletion']['auc']:.4f} ± {d['deletion']['auc_sem']:.4f} | "
                                 f"{d['insertion']['auc']:.4f} ± {d['insertion']['auc_sem']:.4f} |")
        lines.append("")
    if "road" in metrics:
        fr = results.get("road_fractions", [])
        lines += ["## ROAD (noisy linear imputation)", "",
                  f"Removed patches are imputed from their neighbours plus noise (std {results['config'].get('road_noise')}); "
                  f"removed fractions {fr[0]:.2f}..{fr[-1]:.2f} (removing all leaves nothing to impute from). "
                  "MoRF: most relevant first (lower better); LeRF: least relevant first (higher better).", "",
                  "| method | MoRF AUC (lower better) | LeRF AUC (higher better) |", "|---|---|---|"]
        for m, e in methods.items():
            if "road" in e:
                r = e["road"]
                lines.append(f"| {m} | {r['positive']['auc']:.4f} ± {r['positive']['auc_sem']:.4f} | "
                             f"{r['negative']['auc']:.4f} ± {r['negative']['auc_sem']:.4f} |")
        lines.append("")
    props = [p for p in ("sparseness", "complexity", "intensity") if p in metrics]
    if props:
        head = {"sparseness": "sparseness (Gini, higher = sparser)", "complexity": "complexity (entropy, nats)",
                "intensity": "Spearman with patch intensity"}
        lines += ["## Properties of the scores", "",
                  "Gini index and entropy of each image's absolute patch scores; Spearman correlation of the scores "
                  "with the patches' mean input intensity (what the scores key on).", "",
                  "| method | " + " | ".join(head[p] for p in props) + " |", "|---" * (len(props) + 1) + "|"]
        for m, e in methods.items():
            cells = [f"{e[p]['mean']:.3f} ± {e[p]['sem']:.3f}" if p in e else "–" for p in props]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    for ref, rows in versus_best_baselines(results).items():
        name = "DiffMask path" if ref == "diffmask-path" else "DiffMask"
        if rows:
            lines += [f"## {name} against the best baseline of each curve", "",
                      "Best baseline: the method (not DiffMask's own rows, not random) with the best mean AUC on the "
                      "curve. Most relevant first (positive, deletion, MoRF; lower better): level when the AUC is "
                      "within one standard error of the best's; least relevant first (negative, insertion, LeRF): "
                      f"level when the paired 95% interval of {ref} − best includes or exceeds 0.", "",
                      f"| curve | {ref} | best baseline | paired difference | level |", "|---|---|---|---|---|"]
            for r in rows:
                verdict = "yes" if r["met"] else f"no (short by {r['miss']:.4f})"
                lines.append(f"| {r['curve']} | {r['auc']:.4f} ± {r['sem']:.4f} | {r['best']} {r['best_auc']:.4f} ± "
                             f"{r['best_sem']:.4f} | {r['diff']:+.4f} ± {r['diff_sem']:.4f} | {verdict} |")
            lines.append("")
        rows = _paired_rows(results, ref)
        if rows:
            lines += [f"## Paired differences to {name} (AUC of P(original class), same images)", "",
                      f"Mean ± standard error of the per-image difference method − {ref}. First column (positive, "
                      f"deletion, MoRF): a negative difference means the method beats {ref}; second column "
                      "(negative, insertion, LeRF): a positive one.", "",
                      "| method | test | most relevant first | least relevant first / insertion |", "|---|---|---|---|"]
            lines += rows + [""]
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
    rnd = results.get("randomisation")
    if rnd:
        ks = rnd["ks"]
        lines += ["## Model-randomisation sanity test (cascading)", "",
                  "The classifier head and the top k encoder blocks re-initialised; Spearman correlation per image "
                  "between each method's scores on the trained and on the randomised model (lower = the method "
                  "depends on what the model learned; near 1 = it does not). `diffmask`: the trained gates read "
                  "the randomised model's hidden states"
                  + ("; `diffmask-retrained`: gates retrained briefly on the randomised model, compared with the "
                     "trained model's DiffMask scores" if rnd.get("retrained") else "") + ".", "",
                  "| method | " + " | ".join(f"top {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|",
                  "| *predictions changed* | " + " | ".join(f"{v:.2f}" for v in rnd["prediction_change"]) + " |"]
        for m, e in rnd["methods"].items():
            lines.append(f"| {m} | " + " | ".join(f"{d['mean']:.3f} ± {d['sem']:.3f}" for d in e["spearman"]) + " |")
        lines += ["", "Spearman of the randomised model's scores with the patches' mean input intensity:", "",
                  "| method | " + " | ".join(f"top {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for m, e in rnd["methods"].items():
            lines.append(f"| {m} | " + " | ".join(f"{d['mean']:.3f}" for d in e["intensity_spearman"]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(results: dict, out_dir, examples: dict | None = None, *, plots: bool = True) -> list:
    """Write ``results.json``, ``results.md`` and (``plots``) ``curves_<replacement>.png``, ``examples.png``
    (each method's scores beside the untouched image) and ``examples_depth.png`` (DiffMask's mask at
    each depth) into ``out_dir``; returns the written paths."""
    from pathlib import Path

    from .._io import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    results = {**results, "versus_best_baseline": versus_best_baselines(results)}
    atomic_write_json(written[0], results)
    atomic_write_bytes(written[1], results_markdown(results).encode())
    if plots:
        from .._io import atomic_path
        from ..visualize import depth_grid, example_grid, plot_curves

        metrics = results.get("metrics", ["perturbation"])
        if "perturbation" in metrics or "insertion-deletion" in metrics:
            for rp in results["config"]["replacements"]:
                p = out / f"curves_{rp}.png"
                plot_curves(results, p, replacement=rp, title=f"{results.get('model')} on {results.get('data')}: "
                                                              f"{rp} replacement, n={results['n']}")
                written.append(p)
        if "road" in metrics:
            p = out / "curves_road.png"
            plot_curves(results, p, replacement=None, title=f"{results.get('model')} on {results.get('data')}: "
                                                            f"ROAD (noisy linear imputation), n={results['n']}")
            written.append(p)
        if examples and examples.get("images"):
            pictures = {"examples.png": example_grid(examples["images"], examples["scores"], kept=examples.get("kept"),
                                                     truth=examples.get("truth"), labels=examples.get("labels"))}
            if examples.get("depths") is not None:
                pictures["examples_depth.png"] = depth_grid(examples["images"], examples["depths"],
                                                            threshold=results.get("threshold", 0.5),
                                                            labels=examples.get("labels"))
            for name, picture in pictures.items():
                with atomic_path(out / name, suffix=".png") as tmp:
                    picture.save(tmp, format="PNG")
                written.append(out / name)
    return written
