"""Reports of evaluation results: paired differences, a markdown summary, the files on disk."""

from __future__ import annotations

import math

import numpy as np

from .metrics import ORDERS

__all__ = ["paired_difference", "results_markdown", "write_report"]

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
    """Write ``results.json``, ``results.md`` and (``plots``) ``curves_<replacement>.png``, ``examples.png``
    (each method's scores beside the untouched image) and ``examples_depth.png`` (DiffMask's mask at
    each depth) into ``out_dir``; returns the written paths."""
    from pathlib import Path

    from .._io import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    atomic_write_json(written[0], results)
    atomic_write_bytes(written[1], results_markdown(results).encode())
    if plots:
        from .._io import atomic_path
        from ..visualize import depth_grid, example_grid, plot_curves

        for rp in results["config"]["replacements"]:
            p = out / f"curves_{rp}.png"
            plot_curves(results, p, replacement=rp, title=f"{results.get('model')} on {results.get('data')}: "
                                                          f"{rp} replacement, n={results['n']}")
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
