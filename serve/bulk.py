"""Bulk explanation on Ray Data: a whole data set through an actor pool of explainers, into Parquet shards.

``explain_dataset(BulkConfig(...))`` lists the images of a source in a fixed order
(``bulk_sources``), cuts them into shards of ``shard_size`` consecutive indices, skips the shards
already complete in ``out``, and streams the others through Ray Data: decoding and preprocessing
in CPU tasks, explaining in ``map_batches`` with ``_ExplainActor`` (one ``ServingModel``, i.e. one
``Explainer`` or ``OnnxExplainer``, per actor; ``concurrency`` actors, ``num_gpus_per_actor`` GPUs
each). The driver gathers each shard's rows and writes the shard atomically once all of them have
arrived (``bulk_output``), so a killed run resumes exactly: every image ends up once, either in a
shard or in the errors file. The same call runs on a laptop (a local Ray instance) and on a cluster
(``address``); on a cluster ``out`` and image paths must be visible to the driver and the workers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bulk_output import complete_shards, summarize, write_shard
from .bulk_sources import BulkSource, open_bulk_source
from .config import check_field

__all__ = ["BulkConfig", "explain_dataset", "RUN_FIELDS"]

#: run.json fields that must match for a rerun to continue a run in the same folder.
RUN_FIELDS = ("source", "n_images", "ids_sha256", "shard_size", "model", "model_sha256", "gates_sha256",
              "top_k", "threshold", "layer_masks", "verify")


@dataclass(frozen=True)
class BulkConfig:
    """A bulk run.

    Attributes:
        dataset: source spec (``bulk_sources.open_bulk_source``).
        out: output folder (created); a rerun with the same folder and settings resumes.
        model, gates, onnx, allow_backbone_mismatch: the explainer, as ``vdm-explain``.
        batch_size: images per decoding task and per forward pass.
        shard_size: images per Parquet shard (the unit of resumption).
        concurrency: explainer actors (default: one per ``num_gpus_per_actor`` GPUs of the cluster,
            else 1).
        num_gpus_per_actor: GPUs per actor (fractions allowed); > 0 runs the explainer on CUDA.
        cpus_per_actor: Ray CPUs per actor, also its torch threads (rounded, at least 1).
        decode_cpus: Ray CPUs per decoding task.
        address: an existing Ray cluster (``auto``, ``HOST:PORT``, ``ray://...``); None starts a local
            instance unless this process is already connected to one.
        limit: explain only the first ``limit`` images of the source.
        top_k, threshold: as ``vdm-explain``; layer_masks: also store (L+2, N) masks per image;
            verify: run the masked pass and store ``kl``, ``agree``, ``masked_kept``.
        max_pixels: pixel limit for image files (default ``resolve_max_pixels()``).
    """

    dataset: str
    out: str
    model: str = "vit-digits"
    gates: str | None = None
    onnx: str | None = None
    allow_backbone_mismatch: bool = False
    batch_size: int = 64
    shard_size: int = 1024
    concurrency: int | None = None
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    decode_cpus: float = 0.5
    address: str | None = None
    limit: int | None = None
    top_k: int = 5
    threshold: float = 0.5
    layer_masks: bool = False
    verify: bool = False
    max_pixels: int | None = None

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            check_field(self, ok, field, what)

        if self.onnx is not None and self.gates is not None:
            raise ValueError("BulkConfig.gates applies to model; an exported graph (onnx) carries its gates")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.shard_size >= 1, "shard_size", "must be >= 1")
        need(self.concurrency is None or self.concurrency >= 1, "concurrency", "must be >= 1")
        need(self.num_gpus_per_actor >= 0, "num_gpus_per_actor", "must be >= 0")
        need(self.cpus_per_actor > 0, "cpus_per_actor", "must be > 0")
        need(self.decode_cpus > 0, "decode_cpus", "must be > 0")
        need(self.limit is None or self.limit >= 1, "limit", "must be >= 1")
        need(self.top_k >= 1, "top_k", "must be >= 1")
        need(0.0 <= self.threshold < 1.0, "threshold", "must be in [0, 1)")
        need(self.max_pixels is None or self.max_pixels >= 1, "max_pixels", "must be >= 1")

    def serve_config(self, device: str | None = None):
        from .config import ServeConfig

        return ServeConfig(model=self.model, gates=self.gates, onnx=self.onnx, device=device,
                           allow_backbone_mismatch=self.allow_backbone_mismatch, top_k=self.top_k,
                           threshold=self.threshold)


# ----- the decoding task -----------------------------------------------------------------------------
def _decode_batch(batch: dict, *, loader, image_spec, uint8_input: bool, max_pixels: int | None) -> dict:
    """Rows of the source table -> model inputs (B, ...) and an ``error`` per row ("" when readable)."""
    from vdm_engine.images import decode_image, read_image
    from vdm_engine.preprocessing import preprocess_images, resize_images

    n = len(batch["index"])
    model_size = tuple(image_spec.size) if image_spec.do_resize else None
    images, errors = [None] * n, [""] * n
    by_loader = [i for i in range(n) if batch["path"][i] is None and batch["data"][i] is None]
    if by_loader:
        for i, im in zip(by_loader, loader([batch["index"][i] for i in by_loader])):
            images[i] = im
    for i in range(n):
        if images[i] is not None:
            continue
        try:
            if batch["path"][i] is not None:
                images[i] = read_image(batch["path"][i], max_pixels=max_pixels, model_size=model_size).pixels
            else:
                images[i] = decode_image(bytes(batch["data"][i]), name=str(batch["id"][i]), max_pixels=max_pixels,
                                         model_size=model_size).pixels
        except Exception as e:  # unreadable: recorded, never fatal
            errors[i] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    ok = [i for i in range(n) if not errors[i]]
    prep = resize_images if uint8_input else preprocess_images
    x = prep([images[i] for i in ok], image_spec).numpy() if ok else None
    shape = (n, *x.shape[1:]) if x is not None else (n, *((*image_spec.size, 3) if uint8_input else (3, *image_spec.size)))
    pixels = np.zeros(shape, dtype=np.uint8 if uint8_input else np.float32)
    if ok:
        pixels[ok] = x
    return {
        "index": np.asarray(batch["index"], dtype=np.int64),
        "id": np.asarray([str(v) for v in batch["id"]], dtype=object),
        "path": np.asarray(["" if v is None else str(v) for v in batch["path"]], dtype=object),
        "true_label": np.asarray([-1 if v is None or v != v else int(v) for v in batch["label"]], dtype=np.int64),
        "error": np.asarray(errors, dtype=object),
        "pixels": pixels,
    }


# ----- the explaining actor ----------------------------------------------------------------------
class _ExplainActor:
    """One explainer per actor; ``__call__`` explains a decoded batch (error rows pass through as NaN)."""

    def __init__(self, config: BulkConfig, device: str | None, threads: int):
        import torch

        from .backend import ServingModel

        torch.set_num_threads(threads)
        self.config = config
        self.model = ServingModel(config.serve_config(device), prog="vdm-explain")
        self.id2label = self.model.id2label

    def __call__(self, batch: dict) -> dict:
        import torch

        cfg = self.config
        n = len(batch["index"])
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        out = {k: batch[k] for k in ("index", "id", "path", "true_label", "error")}
        N = self.model.grid[0] * self.model.grid[1]
        k = min(cfg.top_k, self.model.num_labels)
        cols = {
            "label": np.full(n, "", dtype=object), "label_index": np.full(n, -1, np.int64),
            "score": np.full(n, np.nan, np.float32), "top_k_index": np.full((n, k), -1, np.int64),
            "top_k_label": np.full((n, k), "", dtype=object), "top_k_score": np.full((n, k), np.nan, np.float32),
            "patch_mask": np.full((n, N), np.nan, np.float32), "kept_fraction": np.full(n, np.nan, np.float32),
        }
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            res = self.model.explain_batch(x, verify=[True] * int(ok.sum()) if cfg.verify else None,
                                           layer_masks=cfg.layer_masks)
            probs = res["logits"].float().softmax(-1)
            top = probs.topk(k, dim=-1)
            idx = top.indices.numpy()
            cols["top_k_index"][ok] = idx
            cols["top_k_score"][ok] = top.values.numpy()
            cols["top_k_label"][ok] = np.vectorize(lambda c: self.id2label.get(int(c), str(int(c))), otypes=[object])(idx)
            cols["label_index"][ok] = idx[:, 0]
            cols["label"][ok] = cols["top_k_label"][ok][:, 0]
            cols["score"][ok] = top.values[:, 0].numpy()
            pm = res["patch_mask"].float()
            cols["patch_mask"][ok] = pm.numpy()
            cols["kept_fraction"][ok] = (pm > cfg.threshold).float().mean(-1).numpy()
            if cfg.layer_masks:
                lm = res["layer_masks"].float().numpy()
                cols["layer_masks"] = np.full((n, *lm.shape[1:]), np.nan, np.float32)
                cols["layer_masks"][ok] = lm
            if cfg.verify:
                for name, dtype in (("kl", np.float32), ("agree", bool), ("masked_kept", np.float32)):
                    cols[name] = np.zeros(n, dtype) if dtype is bool else np.full(n, np.nan, dtype)
                    cols[name][ok] = res[name].numpy()
        elif cfg.layer_masks or cfg.verify:  # a batch of errors only: keep the columns the other batches have
            if cfg.layer_masks:
                L = self.model.impl.backbone.num_hidden_states if not self.model.onnx else self.model.impl.num_hidden_states
                cols["layer_masks"] = np.full((n, L, N), np.nan, np.float32)
            if cfg.verify:
                cols.update(kl=np.full(n, np.nan, np.float32), agree=np.zeros(n, bool),
                            masked_kept=np.full(n, np.nan, np.float32))
        out.update(cols)
        return out


# ----- the driver ----------------------------------------------------------------------------------
def _run_record(config: BulkConfig, source: BulkSource, model) -> dict:
    ids_sha = hashlib.sha256("\n".join(source.table.column("id").to_pylist()).encode()).hexdigest()
    return {
        "source": config.dataset, "description": source.description, "n_images": len(source),
        "ids_sha256": ids_sha, "shard_size": config.shard_size, "limit": config.limit,
        "n_shards": -(-len(source) // config.shard_size),
        "model": model.name, "model_sha256": model.model_sha256, "gates_sha256": model.gates_sha256,
        "gates_source": model.gates_source, "backbone_mismatch": bool(model.backbone_mismatch),
        "grid": list(model.grid), "num_labels": model.num_labels,
        "top_k": config.top_k, "threshold": config.threshold, "layer_masks": config.layer_masks,
        "verify": config.verify,
    }


def _check_or_write_run(out: Path, run: dict) -> None:
    from vdm_engine._io import atomic_write_json

    path = out / "run.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        diff = [f for f in RUN_FIELDS if old.get(f) != run.get(f)]
        if diff:
            f = diff[0]
            raise ValueError(
                f"{out} holds another bulk run ({f}: {old.get(f)!r} there, {run.get(f)!r} now); "
                "rerun with the same dataset and options to resume it, or choose another --out")
        return
    atomic_write_json(path, run)


def _ray_init(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    from .app import _PASSED_ENV

    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ and k != "OMP_NUM_THREADS"}
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    # "local": a new instance of our own, never one another process started on this machine
    ray.init(address=address or "local", **kwargs)


def _pending_table(source: BulkSource, done: set[int], shard_size: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    t = source.table
    if not done:
        return t
    shard = pc.divide(t.column("index"), pa.scalar(shard_size, pa.int64()))
    keep = pc.invert(pc.is_in(shard, value_set=pa.array(sorted(done), pa.int64())))
    return t.filter(keep)


def explain_dataset(config: BulkConfig, *, progress: bool = True, log=None, source: BulkSource | None = None) -> dict:
    """Explain every image of ``config.dataset`` into ``config.out`` (see the module docstring).

    ``source`` replaces opening ``config.dataset`` (e.g. ``open_bulk_source("digits").repeat(3)``);
    ``config.dataset`` then only names it in ``run.json``.

    Returns:
        The summary written to ``out/summary.json``: ``images``, ``explained``, ``errors``,
        ``seconds``, ``images_per_s`` (this run), ``startup_s`` (until the first shard was written),
        ``steady_images_per_s`` (after it), ``kept_fraction`` histogram, ``agreement_rate``
        (``verify``), ``per_class`` counts and the provenance.

    Raises:
        ValueError: a bad source, an unusable model option, or an ``out`` holding another run.
    """
    from vdm_engine._io import atomic_write_bytes, atomic_write_json

    from .backend import ServingModel

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(config.out)
    source = source if source is not None else open_bulk_source(config.dataset)
    if config.limit is not None and config.limit < len(source):
        source = BulkSource(source.spec, f"{source.description} (first {config.limit})",
                            source.table.slice(0, config.limit), source.loader)
    model = ServingModel(config.serve_config(), prog="vdm-explain")  # the driver's: checks, provenance, preprocessing
    if config.verify and not model.can_verify:
        raise ValueError(f"--verify needs the masked pass; {config.onnx} lacks the kl/masked_logits outputs "
                         "(export with --outputs logits,patch_mask,masked_logits,kl)")
    if config.layer_masks and model.onnx and "layer_masks" not in model.impl.output_names:
        raise ValueError(f"--layer-masks: {config.onnx} has no layer_masks output (export with it)")
    run = _run_record(config, source, model)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_run(out, run)
    S, n_shards = config.shard_size, run["n_shards"]
    for tmp in (out / "shards").glob(".part-*.tmp"):  # left by a killed run's unfinished atomic write
        tmp.unlink(missing_ok=True)
    done = complete_shards(out, n_shards)
    pending = _pending_table(source, done, S)
    provenance = {k: run[k] for k in ("model", "model_sha256", "gates_sha256", "gates_source", "backbone_mismatch")}
    provenance["source"] = config.dataset
    t0 = time.perf_counter()
    processed, flushes = 0, []
    if pending.num_rows:
        if done:
            log(f"vdm-explain: resuming {out}: {len(done)} of {n_shards} shards already complete")
        processed = _stream(config, source, model, pending, out, provenance, progress, flushes)
    seconds = time.perf_counter() - t0
    summary = summarize(out, run, seconds=seconds, processed=processed)
    # Throughput once the pipeline runs: images of every shard after the first, over the time they took.
    summary["startup_s"] = round(flushes[0][0] - t0, 3) if flushes else None
    if len(flushes) > 1 and flushes[-1][0] > flushes[0][0]:
        rest = sum(c for _, c in flushes[1:])
        summary["steady_images_per_s"] = round(rest / (flushes[-1][0] - flushes[0][0]), 2)
    else:
        summary["steady_images_per_s"] = None
    from .bulk_output import read_errors

    errors = read_errors(out)
    atomic_write_bytes(out / "errors.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    atomic_write_json(out / "summary.json", summary)
    return summary


def _stream(config: BulkConfig, source: BulkSource, model, pending, out: Path, provenance: dict,
            progress: bool, flushes: list) -> int:
    """Run the pending rows through Ray Data and write each shard as soon as it is whole; images explained."""
    import ray

    _ray_init(config.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    S, n = config.shard_size, len(source)
    gpus = config.num_gpus_per_actor
    concurrency = config.concurrency
    if concurrency is None:
        concurrency = max(1, int(ray.cluster_resources().get("GPU", 0) // gpus)) if gpus > 0 else 1
    # Blocks of one batch each: the decoding tasks and the actors stream instead of waiting for a whole shard.
    B = config.batch_size
    blocks = [pending.slice(s, B) for s in range(0, pending.num_rows, B)]
    decode = functools.partial(_decode_batch, loader=source.loader, image_spec=model.image_spec,
                               uint8_input=bool(model.onnx and model.impl.uint8_input), max_pixels=config.max_pixels)
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode, batch_size=B, batch_format="numpy", num_cpus=config.decode_cpus)
    ds = ds.map_batches(
        _ExplainActor, batch_size=B, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=config.cpus_per_actor, num_gpus=gpus or None,
        fn_constructor_kwargs={"config": config, "device": "cuda" if gpus > 0 else None,
                               "threads": max(1, int(round(config.cpus_per_actor)))},
    )
    expected = {k: min(S, n - k * S) for k in range(-(-n // S))}
    buffers: dict[int, list[dict]] = {}
    counts: dict[int, int] = {}
    processed = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        shard_of = batch["index"] // S
        for k in np.unique(shard_of):
            k = int(k)
            rows = {c: v[shard_of == k] for c, v in batch.items()}
            buffers.setdefault(k, []).append(rows)
            counts[k] = counts.get(k, 0) + len(rows["index"])
            if counts[k] == expected[k]:
                processed += _flush(out, k, buffers.pop(k), provenance)
                flushes.append((time.perf_counter(), expected[k]))
    if buffers:  # cannot happen unless Ray Data lost or duplicated rows
        raise RuntimeError(f"shards {sorted(buffers)} did not receive all their images; rerun to complete them")
    return processed


def _flush(out: Path, k: int, parts: list[dict], provenance: dict) -> int:
    """Write shard ``k`` from its collected parts; the number of images explained in it."""
    rows = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    order = np.argsort(rows["index"], kind="stable")
    rows = {c: v[order] for c, v in rows.items()}
    bad = np.asarray([bool(e) for e in rows["error"]], dtype=bool)
    errors = [{"id": str(rows["id"][i]), "index": int(rows["index"][i]), "path": str(rows["path"][i]) or None,
               "reason": str(rows["error"][i])} for i in np.flatnonzero(bad)]
    good = {c: v[~bad] for c, v in rows.items() if c not in ("error", "pixels")}
    write_shard(out, k, good, errors, provenance)
    return int((~bad).sum())
