"""JSON records of explanations: what ``vdm-explain`` writes and ``vdm-serve`` answers, built once.

Only the per-image fields that come from an ``Explanation`` live here (label, score, top-k, patch
mask on the grid, kept fraction); callers add where the image came from and the model's checksums.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["prediction_records", "explanation_records", "overlay_caption", "model_sha256"]


def prediction_records(logits, id2label: dict[int, str], *, top_k: int = 5) -> list[dict]:
    """One dict per row of ``logits`` (B, C): ``label``, ``label_index``, ``score`` (softmax) and
    ``top_k`` (``index``, ``label``, ``score``, best first, at most C)."""
    probs = logits.detach().float().softmax(-1).cpu()
    top = probs.topk(min(int(top_k), probs.shape[-1]), dim=-1)
    records = []
    for idx, vals in zip(top.indices.tolist(), top.values.tolist()):
        top_list = [{"index": int(c), "label": id2label.get(int(c), str(int(c))), "score": float(s)}
                    for c, s in zip(idx, vals)]
        records.append({"label": top_list[0]["label"], "label_index": top_list[0]["index"],
                        "score": top_list[0]["score"], "top_k": top_list})
    return records


def explanation_records(explanation, id2label: dict[int, str], *, top_k: int = 5,
                        threshold: float = 0.5) -> list[dict]:
    """One JSON-ready dict per image of ``explanation`` (B images, on any device).

    Args:
        explanation: an ``Explanation`` with logits (B, C) and patch_mask (B, N).
        id2label: class names; a missing index is named by its number.
        top_k: classes listed (at most C).
        threshold: keep probability above which a patch counts as kept.

    Returns:
        B dicts with ``label``, ``label_index``, ``score``, ``top_k`` (``index``, ``label``,
        ``score``), ``grid`` [h, w], ``patch_mask`` (h rows of w floats), ``threshold``,
        ``kept_fraction``, and with K-level gates ``patch_rank`` (h rows of w floats, higher = more
        relevant: ``masks.patch_rank``).
    """
    h, w = explanation.grid
    masks = explanation.patch_mask.detach().float().cpu().tolist()  # (B, N) as Python floats: one conversion
    rank = explanation.patch_rank
    ranks = rank.detach().float().cpu().tolist() if rank is not None else [None] * len(masks)
    records = prediction_records(explanation.logits, id2label, top_k=top_k)
    for rec, mask, rk in zip(records, masks, ranks):
        rec.update({
            "grid": [h, w],
            "patch_mask": [mask[r * w:(r + 1) * w] for r in range(h)],
            "threshold": threshold,
            "kept_fraction": sum(v > threshold for v in mask) / len(mask),
        })
        if rk is not None:
            rec["patch_rank"] = [rk[r * w:(r + 1) * w] for r in range(h)]
    return records


def overlay_caption(model_name: str, record: dict) -> list[str]:
    """The caption lines ``vdm_engine.visualize.overlay`` draws under an explained image: the model,
    the predicted class (name, index, probability), the kept patches, the top-k as ``label (p)``
    lines, and the gates' source when the record names it."""
    grid = record.get("grid")
    n = int(grid[0]) * int(grid[1]) if grid else None
    kept = record["kept_fraction"]
    kept_s = f"kept {kept:.0%} of patches" + (f" ({round(kept * n)} of {n})" if n else "")
    lines = [f"{model_name} predicts {record['label']} (class {record['label_index']}, p={record['score']:.3f}); "
             f"{kept_s}"]
    lines += [f"{r + 1}.  {t['label']}  ({t['score']:.3f})" for r, t in enumerate(record["top_k"])]
    if record.get("gates_sha256") or record.get("gates_source"):
        sha = (record.get("gates_sha256") or "")[:12]
        lines.append(f"gates: {record.get('gates_source') or 'unknown source'}" + (f", sha256 {sha}" if sha else ""))
    return lines


def model_sha256(backbone) -> str | None:
    """sha256 of the backbone's weights file (local directory or hub cache), else None."""
    from ._io import sha256_file
    from .backbone import resolve_model_source

    try:
        source = resolve_model_source(backbone.name_or_path)
    except Exception:
        return None
    if os.path.isdir(source):
        f = Path(source) / "model.safetensors"
        return sha256_file(f) if f.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(source, "model.safetensors", revision=backbone.revision)
        return sha256_file(f) if isinstance(f, str) and os.path.isfile(f) else None
    except Exception:
        return None
