"""Bulk explanation on Ray Data: a whole data set through an actor pool of explainers, into Parquet shards.

``explain_dataset(BulkConfig(...))`` lists the images of a source in a fixed order
(``bulk_sources``), cuts them into shards of ``shard_size`` consecutive indices, skips the shards
already complete in ``out``, and streams the others through Ray Data in blocks of
``BulkConfig.block_size`` images: decoded to uint8 at the model size in CPU tasks (a source held in
memory sends its uint8 images in the blocks instead), explained in ``map_batches`` by
``_ExplainActor`` (one ``ServingModel``, i.e. one ``Explainer`` or ``OnnxExplainer``, per actor;
``concurrency`` actors, ``num_gpus_per_actor`` GPUs each), which returns fixed-shape numeric
columns only. The driver adds
ids, paths and class names from the source table and writes each shard with pyarrow, atomically,
once all its images have arrived (``bulk_output``), so a killed run resumes exactly: every image
ends up once, either in a shard or in the errors file. The same call runs on a laptop (a local Ray
instance) and on a cluster (``address``); on a cluster ``out`` and image paths must be visible to
the driver and the workers.
"""

from __future__ import annotations

import dataclasses
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
from .raycluster import init_ray

__all__ = ["BulkConfig", "explain_dataset", "RUN_FIELDS", "MAX_BLOCK", "BLOCK_BYTES"]

MAX_BLOCK = 1024  # images per block at most (BulkConfig.block_size)
BLOCK_BYTES = 64 << 20  # float32 model input per block at most

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
        batch_size: images per Ray Data block, i.e. per decoding task and per forward pass. Default
            (``block_size``): the largest power of two up to ``MAX_BLOCK`` (1024) whose float32 model
            input stays within ``BLOCK_BYTES`` (64 MiB): 1024 for 32x32 digits, 64 at 224x224. Ray
            Data costs tens of milliseconds per block whatever its size, so a block must be large
            against that; the bound keeps a block's inputs and activations small beside an actor's memory.
        shard_size: images per Parquet shard (the unit of resumption).
        concurrency: explainer actors (default: as many as the cluster holds, one per
            ``num_gpus_per_actor`` GPUs or else one per ``cpus_per_actor`` CPUs, started as
            resources allow; see ``_actor_pool``).
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
    batch_size: int | None = None
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
        need(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.shard_size >= 1, "shard_size", "must be >= 1")
        need(self.concurrency is None or self.concurrency >= 1, "concurrency", "must be >= 1")
        need(self.num_gpus_per_actor >= 0, "num_gpus_per_actor", "must be >= 0")
        need(self.cpus_per_actor > 0, "cpus_per_actor", "must be > 0")
        need(self.decode_cpus > 0, "decode_cpus", "must be > 0")
        need(self.limit is None or self.limit >= 1, "limit", "must be >= 1")
        need(self.top_k >= 1, "top_k", "must be >= 1")
        need(0.0 <= self.threshold < 1.0, "threshold", "must be in [0, 1)")
        need(self.max_pixels is None or self.max_pixels >= 1, "max_pixels", "must be >= 1")

    def block_size(self, image_size: tuple[int, int]) -> int:
        """Images per block: ``batch_size``, or the rule above for (H, W) model inputs."""
        if self.batch_size is not None:
            return self.batch_size
        per_image = 3 * image_size[0] * image_size[1] * 4
        fit = max(1, BLOCK_BYTES // per_image)
        return min(MAX_BLOCK, 1 << (fit.bit_length() - 1))

    def serve_config(self, device: str | None = None):
        from .config import ServeConfig

        return ServeConfig(model=self.model, gates=self.gates, onnx=self.onnx, device=device,
                           allow_backbone_mismatch=self.allow_backbone_mismatch, top_k=self.top_k,
                           threshold=self.threshold)


# ----- decoding --------------------------------------------------------------------------------------
def _decode_batch(batch: dict, *, loader, image_spec, max_pixels: int | None) -> dict:
    """The decoding task: rows of the source table -> ``index`` (B,) int64, ``error`` (B,) str ("" when
    readable) and ``pixels`` uint8 (B, H, W, 3) at the model size (zeros for unreadable rows).

    Files and bytes are reduced towards the model size while decoding, then resized to it; rescaling
    and normalising are the actor's (``ServingModel.preprocess``), so uint8 travels through the object
    store, a quarter of the float32 bytes.
    """
    from vdm_engine.images import decode_image, read_image
    from vdm_engine.preprocessing import resize_images

    n = len(batch["index"])
    model_size = tuple(image_spec.size) if image_spec.do_resize else None
    images, errors = [None] * n, [""] * n
    paths, data = batch["path"], batch["data"]
    by_loader = [i for i in range(n) if paths[i] is None and data[i] is None]
    if by_loader:
        for i, im in zip(by_loader, loader([batch["index"][i] for i in by_loader])):
            images[i] = im
    for i in range(n):
        if images[i] is not None:
            continue
        try:
            if paths[i] is not None:
                images[i] = read_image(paths[i], max_pixels=max_pixels, model_size=model_size).pixels
            else:
                images[i] = decode_image(bytes(data[i]), name=str(batch["id"][i]), max_pixels=max_pixels,
                                         model_size=model_size).pixels
        except Exception as e:  # unreadable: recorded, never fatal
            errors[i] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    ok = [i for i in range(n) if not errors[i]]
    pixels = np.zeros((n, *image_spec.size, 3), dtype=np.uint8)
    if ok:
        pixels[ok] = resize_images([images[i] for i in ok], image_spec).numpy()
    return {"index": np.asarray(batch["index"], dtype=np.int64), "error": np.asarray(errors, dtype=str),
            "pixels": pixels}


# ----- the explaining actor ----------------------------------------------------------------------
class _ExplainActor:
    """One explainer per actor. ``__call__`` explains a batch of ``index`` (B,), ``pixels`` uint8
    (B, h, w, 3) and optionally ``error`` (B,) str: ``_decode_batch``'s columns, or images held in
    memory sent by the driver (``_in_memory_blocks``); ``ServingModel.preprocess`` resizes, rescales
    and normalises them, as ``Explainer.preprocess``. It returns fixed-shape columns only (Ray Data
    tensor columns): ``index``, ``error``, ``label_index``, ``score``, ``top_k_index``/``top_k_score``
    (B, k), ``patch_mask`` (B, N), ``kept_fraction``, ``patch_rank`` (B, N) with K-level gates, and
    ``layer_masks`` (B, L+2, N), ``kl``, ``agree``, ``masked_kept`` when asked. Ids, paths and class names are the driver's to add.
    Unreadable rows pass through as NaN / -1."""

    def __init__(self, config: BulkConfig, device: str | None, threads: int):
        import torch

        from .backend import ServingModel

        torch.set_num_threads(threads)  # the rule: torch threads = the actor's Ray CPUs
        self.config = config
        self.model = ServingModel(config.serve_config(device), prog="vdm-explain")

    def __call__(self, batch: dict) -> dict:
        cfg = self.config
        index, pixels = batch["index"], batch["pixels"]
        error = batch["error"] if "error" in batch else np.full(len(index), "", dtype=str)
        ok = error == ""
        x = self.model.preprocess(pixels if ok.all() else pixels[ok]) if ok.any() else None
        n = len(index)
        N = self.model.grid[0] * self.model.grid[1]
        k = min(cfg.top_k, self.model.num_labels)
        cols = {
            "index": index, "error": error,
            "label_index": np.full(n, -1, np.int64), "score": np.full(n, np.nan, np.float32),
            "top_k_index": np.full((n, k), -1, np.int64), "top_k_score": np.full((n, k), np.nan, np.float32),
            "patch_mask": np.full((n, N), np.nan, np.float32), "kept_fraction": np.full(n, np.nan, np.float32),
        }
        if self.model.has_patch_rank:
            cols["patch_rank"] = np.full((n, N), np.nan, np.float32)
        if cfg.layer_masks:
            L = self.model.impl.backbone.num_hidden_states if not self.model.onnx else self.model.impl.num_hidden_states
            cols["layer_masks"] = np.full((n, L, N), np.nan, np.float32)
        if cfg.verify:
            cols.update(kl=np.full(n, np.nan, np.float32), agree=np.zeros(n, bool),
                        masked_kept=np.full(n, np.nan, np.float32))
        if x is None:
            return cols
        m = int(ok.sum())
        res = self.model.explain_batch(x, verify=[True] * m if cfg.verify else None, layer_masks=cfg.layer_masks)
        top = res["logits"].float().softmax(-1).topk(k, dim=-1)
        pm = res["patch_mask"].float()
        cols["top_k_index"][ok] = top.indices.numpy()
        cols["top_k_score"][ok] = top.values.numpy()
        cols["label_index"][ok] = top.indices[:, 0].numpy()
        cols["score"][ok] = top.values[:, 0].numpy()
        cols["patch_mask"][ok] = pm.numpy()
        cols["kept_fraction"][ok] = (pm > cfg.threshold).float().mean(-1).numpy()
        if self.model.has_patch_rank:
            cols["patch_rank"][ok] = res["patch_rank"].float().numpy()
        if cfg.layer_masks:
            cols["layer_masks"][ok] = res["layer_masks"].float().numpy()
        if cfg.verify:
            for name in ("kl", "agree", "masked_kept"):
                cols[name][ok] = res[name].numpy()
        return cols


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
    init_ray(address, **kwargs)


def _actor_pool(config: BulkConfig, resources: dict, *, decoding: bool):
    """The explainer actor pool: ``config.concurrency`` actors, or by default as many as the cluster
    holds, from one up as resources free: one per ``num_gpus_per_actor`` GPUs, else one per
    ``cpus_per_actor`` CPUs (less one decoding task's share when the source is decoded in tasks).
    On a CPU, one single-threaded actor per core outruns one actor with a thread per core: the
    driver and Ray's own processes take CPU time that stalls every thread of a multi-threaded call."""
    import ray

    if config.concurrency is not None:
        return ray.data.ActorPoolStrategy(size=config.concurrency)
    if config.num_gpus_per_actor > 0:
        n = int(resources.get("GPU", 0) // config.num_gpus_per_actor)
    else:
        n = int((resources.get("CPU", 1) - (config.decode_cpus if decoding else 0.0)) // config.cpus_per_actor)
    n = max(1, n)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=n, initial_size=n)


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
        ``seconds``, ``images_per_s`` (this run), ``startup_s`` (until the first block of results was
        back: Ray, the actors and their model), ``steady_images_per_s`` (the later blocks over the
        time from the first to the last), ``block_size``, ``kept_fraction`` histogram, ``agreement_rate``
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
        source = dataclasses.replace(source, description=f"{source.description} (first {config.limit})",
                                     table=source.table.slice(0, config.limit))
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
    processed, arrivals = 0, []
    if pending.num_rows:
        if done:
            log(f"vdm-explain: resuming {out}: {len(done)} of {n_shards} shards already complete")
        processed = _stream(config, source, model, pending, out, provenance, progress, arrivals)
    seconds = time.perf_counter() - t0
    summary = summarize(out, run, seconds=seconds, processed=processed)
    # Start-up: until the first block's results were back (Ray, the actors, the model loads).
    # Steady: the images of every later block over the time from the first block to the last.
    summary["startup_s"] = round(arrivals[0][0] - t0, 3) if arrivals else None
    steady = None
    if len(arrivals) > 1 and arrivals[-1][0] > arrivals[0][0]:
        steady = round(sum(c for _, c in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0]), 2)
    summary["steady_images_per_s"] = steady
    summary["block_size"] = config.block_size(model.image_size)
    from .bulk_output import read_errors

    errors = read_errors(out)
    atomic_write_bytes(out / "errors.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    atomic_write_json(out / "summary.json", summary)
    return summary


def _stream(config: BulkConfig, source: BulkSource, model, pending, out: Path, provenance: dict,
            progress: bool, arrivals: list) -> int:
    """Run the pending rows through Ray Data and write each shard as soon as it is whole; images explained.
    Appends (time, rows) to ``arrivals`` for every block of results once the driver has handled it."""
    import ray

    _ray_init(config.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    S, n = config.shard_size, len(source)
    gpus = config.num_gpus_per_actor
    pool = _actor_pool(config, ray.cluster_resources(), decoding=not source.in_memory)
    B = config.block_size(model.image_size)
    if source.in_memory:  # the images themselves, as uint8 tensor columns: no decoding stage
        ds = ray.data.from_arrow(_in_memory_blocks(source, pending, B))
    else:  # rows to decode in CPU tasks beside the forward passes (ids, labels and paths stay here)
        rows = pending.select(["index", "id", "path", "data"])
        ds = ray.data.from_arrow([rows.slice(s, B) for s in range(0, rows.num_rows, B)])
        ds = ds.map_batches(functools.partial(_decode_batch, loader=source.loader, image_spec=model.image_spec,
                                              max_pixels=config.max_pixels),
                            batch_size=B, batch_format="numpy", num_cpus=config.decode_cpus)
    ds = ds.map_batches(
        _ExplainActor, batch_size=B, batch_format="numpy", compute=pool,
        num_cpus=config.cpus_per_actor, num_gpus=gpus or None,
        fn_constructor_kwargs={"config": config, "device": "cuda" if gpus > 0 else None,
                               "threads": max(1, int(round(config.cpus_per_actor)))},
    )
    expected = {k: min(S, n - k * S) for k in range(-(-n // S))}
    buffers: dict[int, list[dict]] = {}
    counts: dict[int, int] = {}
    labels = [model.id2label.get(c, str(c)) for c in range(model.num_labels)]
    processed = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        shard_of = batch["index"] // S
        for k in np.unique(shard_of):
            k = int(k)
            part = {c: v[shard_of == k] for c, v in batch.items()}
            buffers.setdefault(k, []).append(part)
            counts[k] = counts.get(k, 0) + len(part["index"])
            if counts[k] == expected[k]:
                processed += _flush(out, k, buffers.pop(k), source, labels, provenance)
        arrivals.append((time.perf_counter(), len(batch["index"])))
    if buffers:  # cannot happen unless Ray Data lost or duplicated rows
        raise RuntimeError(f"shards {sorted(buffers)} did not receive all their images; rerun to complete them")
    return processed


def _in_memory_blocks(source: BulkSource, pending, B: int) -> list:
    """Blocks of ``B`` pending images of an in-memory source: ``index`` and ``pixels`` uint8 (B, h, w, 3)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    index = pending.column("index").to_numpy()
    blocks = []
    for s in range(0, len(index), B):
        idx = index[s : s + B]
        blocks.append(pa.table({"index": pa.array(idx),
                                "pixels": ArrowTensorArray.from_numpy(np.stack(source.loader(idx)))}))
    return blocks


def _flush(out: Path, k: int, parts: list[dict], source: BulkSource, labels: list[str], provenance: dict) -> int:
    """Write shard ``k`` from its collected parts (the actor's columns); the number of images explained in it."""
    cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    order = np.argsort(cols["index"], kind="stable")
    cols = {c: v[order] for c, v in cols.items()}
    import pyarrow as pa

    reasons = cols.pop("error")
    bad = reasons != ""
    rows = source.table.take(pa.array(cols["index"]))  # image i is row i of the source table
    errors = [{"id": rows.column("id")[i].as_py(), "index": int(cols["index"][i]),
               "path": rows.column("path")[i].as_py(), "reason": str(reasons[i])} for i in np.flatnonzero(bad)]
    if bad.any():
        cols, rows = {c: v[~bad] for c, v in cols.items()}, rows.filter(pa.array(~bad))
    write_shard(out, k, cols, rows, labels, errors, provenance)
    return int((~bad).sum())
