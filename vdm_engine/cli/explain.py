"""``vdm-explain IMAGE... [--model MODEL | --onnx PATH] [--out DIR] [--top-k 5] [--max-pixels N]``,
or ``vdm-explain --dataset SRC --out DIR [...]`` for a whole data set on Ray Data.

For each image: ``NAME.overlay.png`` (the image with the kept patches outlined, the keep
probability as a heat map, the image with dropped patches greyed; a caption with the prediction,
top-k and the gates), ``NAME.depth.png`` (the mask at each depth of the forward pass) and a JSON record whose ``warnings`` say how the image
was adapted (e.g. upscaled more than 8x). Images above the pixel limit are refused before decoding,
large ones are reduced while decoding (``vdm_engine.images``). Unreadable or unsupported files are
reported one line each on stderr and the exit code is 2, while the other images are still explained.

``--dataset`` hands the run to ``vdm_engine.serve.bulk`` (the optional ``serve`` extra, imported only
then): Parquet shards, an errors file and ``summary.json`` in DIR; a rerun resumes.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Sequence

from vdm_engine.images import SUPPORTED_FORMATS, load_image, read_image, resolve_max_pixels
from vdm_engine.records import explanation_records, model_sha256, overlay_caption

from ._common import (
    EXIT_USAGE, CliParser, UsageError, add_model_source_args, check_device, check_model, check_out_dir,
    quiet_transformers, run_cli,
)

__all__ = ["main", "explain_files", "load_image", "SUPPORTED_FORMATS"]

PROG = "vdm-explain"


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog=PROG, description="Explain ViT predictions on image files with DiffMask gates.")
    req = p.add_argument_group("required")
    req.add_argument("images", nargs="*", metavar="IMAGE", help="PNG or JPEG files (or --dataset SRC)")
    opt = p.add_argument_group("optional")
    add_model_source_args(opt)
    opt.add_argument("--out", default=None, metavar="DIR",
                     help="output folder (default ./explanations; required with --dataset)")
    opt.add_argument("--top-k", type=int, default=5, help="classes listed in the caption and JSON (default 5)")
    opt.add_argument("--threshold", type=float, default=0.5, help="keep probability above which a patch is kept")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="images per forward pass (default 16; with --dataset up to 1024 by image size, "
                          "see BulkConfig.block_size)")
    opt.add_argument("--device", default=None, help="cpu or cuda (PyTorch path; default cpu)")
    opt.add_argument("--max-pixels", type=int, default=None, metavar="N",
                     help="refuse images with more pixels than this, before decoding "
                          "(default $VDM_MAX_IMAGE_PIXELS or 100000000)")
    bulk = p.add_argument_group("bulk (a whole data set on Ray Data; needs the serve extra)")
    bulk.add_argument("--dataset", default=None, metavar="SRC",
                      help="digits[:SPLIT], toy[:N[:SEED]], imagefolder:PATH, hf:NAME[:SPLIT] or a .parquet/.jsonl "
                           "list of image paths or bytes")
    bulk.add_argument("--shard-size", type=int, default=1024, help="images per Parquet shard (default 1024)")
    bulk.add_argument("--concurrency", type=int, default=None,
                      help="explainer actors (default: as many as the cluster holds: one per --num-gpus-per-actor "
                           "GPUs, else one per --cpus-per-actor CPUs)")
    bulk.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0: CPU)")
    bulk.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor (default 1)")
    bulk.add_argument("--address", default=None, help="join this Ray cluster (auto, HOST:PORT, ray://...); default: a local one")
    bulk.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images of SRC")
    bulk.add_argument("--layer-masks", action="store_true", help="also store the (L+2, N) masks per depth")
    bulk.add_argument("--verify", action="store_true", help="run the masked pass: store kl, agree, masked_kept")
    bulk.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class _Model:
    """What the records need from either back end: explain, preprocess, labels, checksums."""

    def __init__(self, args):
        from vdm_engine._io import sha256_file

        if args.onnx:
            if args.gates:
                raise UsageError("--gates applies to --model; an exported graph carries its gates")
            from vdm_engine.runtime import OnnxExplainer
            if not Path(args.onnx).is_file():
                raise UsageError(f"--onnx {args.onnx}: no such file")
            self.impl = OnnxExplainer(args.onnx)
            meta = self.impl.metadata
            self.name = str(args.onnx)
            self.model_sha256 = sha256_file(args.onnx)
            self.gates_sha256 = meta.gates_sha256 or None
            self.gates_source = meta.gates_source or None
            self.backbone_mismatch = meta.backbone_mismatch
            self.id2label = self.impl.id2label
            if meta.untrained_gates:
                print(f"{PROG}: warning: {args.onnx} was exported with untrained gates; its masks mean nothing",
                      file=sys.stderr)
        else:
            from vdm_engine import Explainer

            model = args.model or "vit-digits"
            self.impl = Explainer.from_pretrained(
                model, gates=args.gates, device=args.device, allow_backbone_mismatch=args.allow_backbone_mismatch
            ).eval()
            print(f"{PROG}: {self.impl.provenance.describe()}", file=sys.stderr)
            self.name = model
            self.model_sha256 = model_sha256(self.impl.backbone)
            self.gates_sha256 = self.impl.gates.sha256
            self.gates_source = self.impl.provenance.source
            self.backbone_mismatch = self.impl.provenance.backbone_mismatch
            self.id2label = self.impl.backbone.id2label

    def preprocess(self, images):
        return self.impl.preprocess(images)

    @property
    def image_spec(self):
        impl = self.impl
        return getattr(impl, "image_spec", None) or getattr(getattr(impl, "backbone", None), "image_spec", None)

    def explain(self, pixel_values):
        return self.impl.explain(pixel_values)


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.stem or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        out.append(stem if n == 1 else f"{stem}-{n}")
    return out


def _png(picture) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def explain_files(model, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, top_k: int = 5,
                  threshold: float = 0.5, batch_size: int = 16, progress: bool = True,
                  max_pixels: int | None = None) -> tuple[list[dict], list[str]]:
    """Explain image files and write ``<stem>.overlay.png`` and ``<stem>.json`` for each into ``out_dir``.

    Files are decoded with ``vdm_engine.images.read_image``: refused above ``max_pixels``, reduced
    while decoding to about twice the model's input size when ``model.image_spec`` is known, and
    each record's ``warnings`` lists how the image was adapted (e.g. upscaled more than 8x).

    Args:
        model: anything with ``preprocess(images)``, ``explain(pixel_values) -> Explanation``,
            ``id2label``, ``name``, ``model_sha256`` and ``gates_sha256``, optionally ``image_spec``
            (see ``_Model``).
        paths: image files (PNG or JPEG).
        out_dir: output folder (created).
        max_pixels: pixel limit per image (default ``resolve_max_pixels()``).

    Returns:
        (records of the explained images, one error line per file that could not be read).
    """
    import torch
    from tqdm.auto import tqdm

    from vdm_engine._io import atomic_write_bytes, atomic_write_json
    from vdm_engine.visualize import depth_strip, overlay

    if top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if not 0.0 <= threshold < 1.0:
        raise UsageError(f"--threshold must be in [0, 1), got {threshold}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if max_pixels is not None and max_pixels < 1:
        raise UsageError(f"--max-pixels must be >= 1, got {max_pixels}")
    try:
        max_pixels = resolve_max_pixels(max_pixels)
    except ValueError as e:  # a bad $VDM_MAX_IMAGE_PIXELS
        raise UsageError(str(e)) from None
    spec = getattr(model, "image_spec", None)
    model_size = tuple(spec.size) if spec is not None and spec.do_resize else None
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    stems = _unique_stems(paths)
    loaded, errors = [], []
    for path, stem in zip(paths, stems):
        try:
            loaded.append((path, stem, read_image(path, max_pixels=max_pixels, model_size=model_size)))
        except ValueError as e:
            errors.append(str(e))
    records = []
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(loaded), desc="explain", unit="img", disable=not progress or len(loaded) < 2)
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        with torch.no_grad():
            exp = model.explain(model.preprocess([img.pixels for _, _, img in chunk])).cpu()
        grids = exp.grid_mask().numpy()
        depths = (None if exp.layer_masks is None
                  else exp.layer_masks.reshape(exp.layer_masks.shape[0], -1, *exp.grid).float().numpy())
        recs = explanation_records(exp, model.id2label, top_k=top_k, threshold=threshold)
        for i, ((path, stem, img), grid, rec) in enumerate(zip(chunk, grids, recs)):
            png = out_dir / f"{stem}.overlay.png"
            caption = overlay_caption(model.name, {**rec, "gates_sha256": model.gates_sha256,
                                                   "gates_source": getattr(model, "gates_source", None)})
            atomic_write_bytes(png, _png(overlay(img.pixels, grid, threshold=threshold, caption=caption)))
            depth_png = None
            if depths is not None:  # an ONNX graph exported without layer_masks has no depths to show
                depth_png = out_dir / f"{stem}.depth.png"
                strip = depth_strip(img.pixels, depths[i], threshold=threshold,
                                    label=f"{model.name}: {rec['label']} (p={rec['score']:.3f})")
                atomic_write_bytes(depth_png, _png(strip))
            record = {
                "image": str(path),
                "image_size": list(img.original_size),
                "overlay": str(png),
                "depth": None if depth_png is None else str(depth_png),
                **rec,
                "warnings": list(img.warnings),
                "model": model.name,
                "model_sha256": model.model_sha256,
                "gates_sha256": model.gates_sha256,
                "gates_source": getattr(model, "gates_source", None),
                "backbone_mismatch": bool(getattr(model, "backbone_mismatch", False)),
            }
            atomic_write_json(out_dir / f"{stem}.json", record)
            records.append(record)
            bar.update(1)
    bar.close()
    return records, errors


def _check_args(args) -> None:
    """What can be refused before any model is loaded: device, model, --onnx file, --out, no readable image."""
    check_device(args.device)
    if args.onnx:
        if not Path(args.onnx).is_file():
            raise UsageError(f"--onnx {args.onnx}: no such file")
    else:
        check_model(args.model or "vit-digits")
    check_out_dir(args.out)
    missing = [p for p in args.images if not Path(p).is_file()]
    if len(missing) == len(args.images):  # some readable: explain those, report the others, exit 2
        p = Path(missing[0])
        what = "no such file" if not p.exists() else "not a file"
        more = f" (and {len(missing) - 1} more images that are not files)" if len(missing) > 1 else ""
        raise UsageError(f"{p}: {what}{more}")


def _bulk(args) -> int:
    """``--dataset``: check what can be checked without Ray, then one ``explain_dataset`` call."""
    if args.images:
        raise UsageError("give image files or --dataset SRC, not both")
    if args.out is None:
        raise UsageError("--dataset needs --out DIR (the folder for the Parquet shards)")
    if args.device is not None:
        raise UsageError("--device applies to image files; with --dataset, use --num-gpus-per-actor for CUDA")
    if args.onnx:
        if args.gates:
            raise UsageError("--gates applies to --model; an exported graph carries its gates")
        if not Path(args.onnx).is_file():
            raise UsageError(f"--onnx {args.onnx}: no such file")
    else:
        check_model(args.model or "vit-digits")
    check_out_dir(args.out)
    try:
        import pyarrow  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--dataset runs on Ray Data, which is not installed: pip install 'vdm-engine[serve]'") from None
    from vdm_engine.serve.bulk import BulkConfig, explain_dataset

    try:
        config = BulkConfig(
            dataset=args.dataset, out=args.out, model=args.model or "vit-digits", gates=args.gates, onnx=args.onnx,
            allow_backbone_mismatch=args.allow_backbone_mismatch, batch_size=args.batch_size,
            shard_size=args.shard_size, concurrency=args.concurrency, num_gpus_per_actor=args.num_gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor, address=args.address, limit=args.limit, top_k=args.top_k,
            threshold=args.threshold, layer_masks=args.layer_masks, verify=args.verify, max_pixels=args.max_pixels,
        )
    except ValueError as e:  # name the flag, not the field
        flag = str(e).split()[0].replace("BulkConfig.", "--").replace("_", "-")
        raise UsageError(f"{flag} {str(e).split(' ', 1)[1]}") from None
    s = explain_dataset(config, progress=not args.no_progress)
    rate = f"{s['images_per_s']:.1f} images/s" if s["images_per_s"] is not None else "nothing left to do"
    print(f"{PROG}: {s['explained']} explained, {s['errors']} errors of {s['images']} images; this run "
          f"{s['explained_this_run']} in {s['seconds']:.1f} s ({rate}) -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = _parser().parse_args(argv)
        if args.dataset is not None:
            quiet_transformers()
            return _bulk(args)
        if not args.images:
            raise UsageError("the following arguments are required: IMAGE (or --dataset SRC)")
        args.out = args.out or "explanations"
        args.batch_size = 16 if args.batch_size is None else args.batch_size
        _check_args(args)
        quiet_transformers()  # after the checks: importing transformers takes seconds
        model = _Model(args)
        records, errors = explain_files(model, args.images, args.out, top_k=args.top_k, threshold=args.threshold,
                                        batch_size=args.batch_size, max_pixels=args.max_pixels)
        for r in records:
            print(f"{r['image']}: {r['label']} ({r['score']:.3f}), kept {r['kept_fraction']:.0%} -> {r['overlay']}")
            for w in r["warnings"]:
                print(f"{PROG}: warning: {r['image']}: {w}", file=sys.stderr)
        for e in errors:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        if errors:
            print(f"{PROG}: {len(errors)} of {len(args.images)} images could not be read", file=sys.stderr)
            return EXIT_USAGE
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
