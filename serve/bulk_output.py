"""What a bulk run leaves in its ``--out`` folder, and reading it back. Needs pyarrow, not Ray.

Layout::

    run.json                      what the run explains and with what (checked on a rerun)
    shards/part-{k:06d}.parquet   images [k*S, (k+1)*S) that were explained, by index; written last
    shards/part-{k:06d}.errors.jsonl   those that could not be read (only when there are some)
    errors.jsonl                  every error line of the run ({"id", "index", "path", "reason"})
    summary.json                  counts, kept-fraction histogram, agreement rate, per-class counts

A shard is complete when its parquet file exists: every file is written atomically (temporary
file, then rename), the errors file before the parquet file, so a run killed at any point leaves
only complete shards and a rerun redoes exactly the others.

Parquet columns, one row per explained image: ``index``, ``id``, ``path``, ``true_label``,
``label``, ``label_index``, ``score``, ``top_k`` (list of {index, label, score}), ``patch_mask``
(N float32, row-major on the grid), ``kept_fraction``, ``patch_rank`` (N float32, higher = more relevant)
with K-level gates, optionally ``layer_masks`` (L+2 x N) and
``kl``, ``agree``, ``masked_kept`` (``--verify``), and the provenance ``model``, ``model_sha256``,
``gates_sha256``, ``gates_source``, ``backbone_mismatch``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["shard_path", "errors_path", "complete_shards", "write_shard", "read_results", "read_errors",
           "read_masks", "BulkMasks", "summarize", "HIST_BINS"]

HIST_BINS = 10  # kept-fraction histogram: [0, 0.1), ..., [0.9, 1.0]


def shard_path(out: Path, k: int) -> Path:
    return Path(out) / "shards" / f"part-{k:06d}.parquet"


def errors_path(out: Path, k: int) -> Path:
    return Path(out) / "shards" / f"part-{k:06d}.errors.jsonl"


def complete_shards(out: Path, n_shards: int) -> set[int]:
    """Shard ids whose parquet file exists."""
    return {k for k in range(n_shards) if shard_path(out, k).is_file()}


def _shard_table(cols: dict, rows, labels: list[str], provenance: dict):
    """A shard's pyarrow Table, built column by column (no Python per row).

    ``cols``: the actor's numeric columns for the shard's explained images, sorted by index (numpy,
    (n,) or (n, ...)); ``rows``: their rows of the source table (``id``, ``path``, ``label``);
    ``labels``: class names by class index."""
    import pyarrow as pa

    n = len(cols["index"])
    names = pa.array(labels, pa.string())
    top_idx = np.asarray(cols["top_k_index"], dtype=np.int32)
    k = top_idx.shape[1]
    top = pa.StructArray.from_arrays(
        [pa.array(top_idx.reshape(-1)), names.take(pa.array(top_idx.reshape(-1))),
         pa.array(np.asarray(cols["top_k_score"], dtype=np.float32).reshape(-1))], names=["index", "label", "score"])
    label_index = np.asarray(cols["label_index"], dtype=np.int32)
    out = {
        "index": pa.array(cols["index"], pa.int64()),
        "id": rows.column("id").combine_chunks(),
        "path": rows.column("path").combine_chunks(),
        "true_label": rows.column("label").combine_chunks(),
        "label": names.take(pa.array(label_index)),
        "label_index": pa.array(label_index),
        "score": pa.array(cols["score"], pa.float32()),
        "top_k": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), top),
        "patch_mask": _fixed(cols["patch_mask"]),
        "kept_fraction": pa.array(cols["kept_fraction"], pa.float32()),
    }
    for name in ("patch_rank", "layer_masks"):
        if name in cols:
            out[name] = _fixed(cols[name])
    for name, typ in (("kl", pa.float32()), ("agree", pa.bool_()), ("masked_kept", pa.float32())):
        if name in cols:
            out[name] = pa.array(cols[name], typ)
    for name in ("model", "model_sha256", "gates_sha256", "gates_source"):  # one value per shard, dictionary-encoded
        value = provenance.get(name)
        indices = pa.array(np.zeros(n, np.int32)) if value is not None else pa.nulls(n, pa.int32())
        out[name] = pa.DictionaryArray.from_arrays(indices, pa.array([] if value is None else [value], pa.string()))
    out["backbone_mismatch"] = pa.array(np.full(n, bool(provenance.get("backbone_mismatch"))), pa.bool_())
    meta = {"vdm_engine.bulk": json.dumps(provenance, sort_keys=True)}
    return pa.table(out).replace_schema_metadata(meta)


def _fixed(a: np.ndarray):
    """(n, d1, ..., dk) float -> nested fixed-size lists of float32."""
    import pyarrow as pa

    a = np.ascontiguousarray(a, dtype=np.float32)
    arr = pa.array(a.reshape(-1), pa.float32())
    for d in reversed(a.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, int(d))
    return arr


def write_shard(out: Path, k: int, cols: dict, rows, labels: list[str], errors: list[dict], provenance: dict) -> None:
    """Write shard ``k`` atomically: its errors file (if any) first, then its parquet file (the marker).
    ``cols``, ``rows``, ``labels``: the explained images (``_shard_table``)."""
    import pyarrow.parquet as pq

    from vdm_engine._io import atomic_path, atomic_write_bytes

    ep = errors_path(out, k)
    if errors:
        atomic_write_bytes(ep, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    elif ep.exists():
        ep.unlink()  # left by an older attempt that read the files differently
    table = _shard_table(cols, rows, labels, provenance)
    with atomic_path(shard_path(out, k), suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def _shard_files(out: Path) -> list[Path]:
    out = Path(out)
    files = sorted((out / "shards").glob("part-*.parquet"))
    if not files and not (out / "run.json").is_file():
        raise ValueError(f"{out} holds no bulk run (no run.json, no shards/part-*.parquet); "
                         "make one with vdm-explain --dataset SRC --out DIR")
    return files


def read_results(out: str | os.PathLike, columns: list[str] | None = None):
    """Every explained image of a run as one pyarrow Table, in index order (shards in order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _shard_files(Path(out))
    tables = [pq.read_table(f, columns=columns) for f in files]
    if not tables:
        return pa.table({c: [] for c in (columns or ["index", "id"])})
    return pa.concat_tables(tables, promote_options="default")


def read_errors(out: str | os.PathLike) -> list[dict]:
    """Every error record of a run's shards ({"id", "index", "path", "reason"}), in index order."""
    rows = []
    for f in sorted((Path(out) / "shards").glob("part-*.errors.jsonl")):
        if f.with_name(f.name.replace(".errors.jsonl", ".parquet")).is_file():  # only complete shards count
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


@dataclass(frozen=True)
class BulkMasks:
    """The DiffMask patch masks of a bulk run, by image id.

    Attributes:
        masks: {id: (N,) float32 keep probabilities, row-major on the patch grid}.
        grid: (h, w) patch grid; gates_sha256, model_sha256: what made them; source: the run folder.
    """

    masks: dict
    grid: tuple[int, int]
    gates_sha256: str | None
    model_sha256: str | None
    source: str = ""


def read_masks(out: str | os.PathLike) -> BulkMasks:
    """The patch masks of a finished bulk run (``run.json`` and its shards); ``ValueError`` if there are none."""
    out = Path(out)
    if not (out / "run.json").is_file():
        raise ValueError(f"{out} is not a bulk run folder (no run.json); make one with vdm-explain --dataset SRC --out DIR")
    run = json.loads((out / "run.json").read_text())
    t = read_results(out, columns=["id", "patch_mask"])
    if t.num_rows == 0:
        raise ValueError(f"{out} holds no explained images yet")
    flat = t.column("patch_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    masks = flat.astype(np.float32).reshape(t.num_rows, -1)
    ids = t.column("id").to_pylist()
    return BulkMasks(dict(zip(ids, masks)), tuple(run["grid"]), run.get("gates_sha256"), run.get("model_sha256"),
                     str(out))


def summarize(out: Path, run: dict, *, seconds: float, processed: int) -> dict:
    """The run's ``summary.json`` from every complete shard: counts, the kept-fraction histogram
    (``HIST_BINS`` bins over [0, 1]), the agreement rate (``--verify``), per-class counts."""
    import pyarrow.parquet as pq

    files = _shard_files(out)
    names = set(pq.read_schema(files[0]).names) if files else set()
    cols = [c for c in ("label", "kept_fraction", "agree", "kl", "true_label", "label_index") if c in names]
    t = read_results(out, columns=cols) if files else None
    n = t.num_rows if t is not None else 0
    errors = read_errors(out)
    summary = {
        "source": run["source"], "images": run["n_images"], "explained": n, "errors": len(errors),
        "complete": n + len(errors) == run["n_images"],
        "seconds": round(seconds, 3), "explained_this_run": processed,
        "images_per_s": round(processed / seconds, 2) if seconds > 0 else None,
        "model": run["model"], "model_sha256": run["model_sha256"], "gates_sha256": run["gates_sha256"],
        "gates_source": run["gates_source"], "threshold": run["threshold"],
    }
    kept = t.column("kept_fraction").to_numpy() if n else np.zeros(0)
    counts, edges = np.histogram(kept, bins=HIST_BINS, range=(0.0, 1.0))
    summary["kept_fraction"] = {"mean": float(kept.mean()) if n else None, "bins": [round(float(e), 2) for e in edges],
                                "counts": counts.tolist()}
    summary["agreement_rate"] = float(np.mean(t.column("agree").to_numpy(zero_copy_only=False))) if n and "agree" in cols else None
    summary["mean_kl"] = float(np.mean(t.column("kl").to_numpy())) if n and "kl" in cols else None
    labels = t.column("label").to_pylist() if n else []
    summary["per_class"] = {k: int(v) for k, v in sorted(_count(labels).items())}
    if n and "true_label" in cols and t.column("true_label").null_count < n:
        true = t.column("true_label").to_numpy(zero_copy_only=False)
        pred = t.column("label_index").to_numpy()
        known = ~np.isnan(true.astype(np.float64))
        summary["accuracy"] = float(np.mean(pred[known] == true[known].astype(np.int64))) if known.any() else None
    return summary


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
